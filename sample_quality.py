"""Measure generated digits with the repo's MNIST classifier as the judge.

    python sample_quality.py --model models/pretrained/vqvae_mnist.pt \\
        --prior-model models/pretrained/prior_mnist.pt --classifier models/pretrained/classifier.pt

For each source of 10,000 images it reports (a) class agreement: how often the classifier predicts the
digit that was asked for (real images: their true label); (b) the Frechet distance between the
classifier's 128-d penultimate features of the source and of the 10,000 test images (torchmetrics'
FID with this classifier as the feature network); (c) the same for 10,000 held-out training images,
the floor; (d) the Inception-style score exp(E KL(p(y|x) || p(y))) with the classifier.
"""
import json
import warnings

import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from generate import sample_prior
from checkpoints import load_classifier, load_prior, load_vqvae
from cli import (ArgumentParser, add_vqvae_size_flags, nonnegative_int, positive_float,
                 positive_int, resolve_device, vqvae_sizes)
from data import MNISTSplit, normalize, to_uint8
from modules import MNISTClassifier
from classifier import TRAIN_IMAGES
from vector_quantizer import count_codes


class Judge(nn.Module):
    """uint8 images (N, 1, 28, 28) -> the classifier's penultimate features, or its logits."""

    num_features = MNISTClassifier.num_features

    def __init__(self, classifier, logits=False):
        super().__init__()
        self.classifier, self.logits = classifier, logits

    def forward(self, images):
        x = normalize(images[:, 0])
        return self.classifier(x) if self.logits else self.classifier.features(x)


def in_batches(fn, tensor, batch_size=1000):
    return torch.cat([fn(chunk) for chunk in tensor.split(batch_size)])


def main():
    p = ArgumentParser(prog="sample_quality.py", description="Judge generated digits.")
    p.add_argument("--model", required=True, help="VQ-VAE checkpoint")
    p.add_argument("--prior-model", required=True)
    p.add_argument("--classifier", required=True)
    p.add_argument("--num-samples", type=positive_int, default=10000)
    p.add_argument("--temperatures", type=positive_float, nargs="+", default=[1.0, 0.7])
    p.add_argument("--data-folder", default="data")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--json", action="store_true")
    add_vqvae_size_flags(p)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    vqvae, _ = load_vqvae(args.model, device, "--model", vqvae_sizes(args))
    prior = load_prior(args.prior_model, device, vqvae.codeBook.K)
    classifier = load_classifier(args.classifier, device)
    n, K = args.num_samples, vqvae.codeBook.K

    train = MNISTSplit(args.data_folder, True, device)
    test = MNISTSplit(args.data_folder, False, device)
    held_out = slice(TRAIN_IMAGES, TRAIN_IMAGES + n)
    labels = torch.arange(n, device=device) % 10
    with torch.no_grad():
        train_codes = in_batches(vqvae.encode, torch.cat([x for x, _ in train.batches(1000)]))
        histogram = count_codes(train_codes, K)
        sources = {  # name -> (uint8 images (N, 1, 28, 28), requested labels or None)
            "seed `--input random` (noise through the VQ-VAE)": (to_uint8(in_batches(
                lambda x: vqvae(x)[0], torch.normal(0.5, 0.5, (n, 1, 28, 28), device=device))),
                None),
            "codes drawn uniformly": (to_uint8(in_batches(
                vqvae.decode, torch.randint(K, (n, 7, 7), device=device))), None),
            "codes drawn from their training histogram": (to_uint8(in_batches(
                vqvae.decode, torch.multinomial(histogram, n * 49, replacement=True).view(n, 7, 7))),
                None),
        }
        # The prior can only be as good as the decoder: its samples are decoded the same way.
        sources["VQ-VAE reconstructions of held-out training images (the prior's ceiling)"] = (
            to_uint8(in_batches(lambda x: vqvae(x)[0], normalize(train.images[held_out]))),
            train.labels[held_out])
        for t in args.temperatures:
            sources[f"Gated PixelCNN prior, temperature {t}"] = (
                to_uint8(sample_prior(prior, vqvae, labels, t)), labels)
        sources["real: held-out training images (floor)"] = (
            train.images[held_out].unsqueeze(1), train.labels[held_out])
        sources["real: test images (the reference itself)"] = (
            test.images[:n].unsqueeze(1), test.labels[:n])

        fid = FrechetInceptionDistance(feature=Judge(classifier), reset_real_features=False).to(device)
        for chunk in test.images.unsqueeze(1).split(1000):
            fid.update(chunk, real=True)
        rows = []
        for name, (images, wanted) in sources.items():
            fid.reset()
            for chunk in images.split(1000):
                fid.update(chunk, real=False)
            score = InceptionScore(feature=Judge(classifier, logits=True)).to(device)
            score.update(images)
            predicted = in_batches(Judge(classifier, logits=True), images).argmax(1)
            rows.append({"source": name, "images": len(images),
                         "agreement": None if wanted is None else
                         (predicted == wanted).float().mean().item(),
                         "frechet_distance": fid.compute().item(),
                         "inception_score": score.compute()[0].item()})
    if args.json:
        print(json.dumps(rows))
        return
    print("| source | class agreement | Frechet distance to test | Inception-style score |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        agreement = "—" if row["agreement"] is None else f"{100 * row['agreement']:.1f}%"
        print(f"| {row['source']} | {agreement} | {row['frechet_distance']:.2f} | "
              f"{row['inception_score']:.2f} |")


if __name__ == "__main__":
    main()
