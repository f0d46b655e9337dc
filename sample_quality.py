"""Measure generated digits with two differently built classifiers as judges.

    python sample_quality.py --model models/pretrained/vqvae_mnist.pt \\
        --prior-model models/pretrained/prior_mnist.pt [--guidance-scales 1 2] [--temperatures 1 0.7]

Each judge (--classifiers; default the repo's CNN and pixel-MLP judges) reports, for each source of
N images (default 10,000): (a) class agreement, how often it predicts the digit that was asked for
(real images: their true label); (b) the Frechet distance between its 128-d penultimate features
of the source and of the 10,000 test images (torchmetrics' FID with the judge as the feature
network); (c) the Inception-style score exp(E KL(p(y|x) || p(y))) (--json only). The sources: three
baselines, the VQ-VAE's reconstructions of held-out training images (the ceiling for a prior,
whose samples the same decoder draws), the prior at every guidance scale x temperature, held-out
real training images (the floor) and the test images themselves.
"""
import json
import os
import warnings

import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from checkpoints import load_classifier, load_prior, load_vqvae
from cli import (ArgumentParser, add_vqvae_size_flags, nonnegative_float, nonnegative_int,
                 positive_float, positive_int, resolve_device, unit_float, vqvae_sizes)
from data import HOLD_OUT, TRAIN_IMAGES, MNISTSplit, normalize, to_uint8
from sampling import sample_prior, sampler_options
from vector_quantizer import count_codes

JUDGES = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "pretrained", name)
          for name in ("classifier.pt", "classifier_mlp.pt")]


class Judge(nn.Module):
    """uint8 images (N, 1, 28, 28) -> the classifier's penultimate features, or its logits."""

    def __init__(self, classifier, logits=False):
        super().__init__()
        self.classifier, self.logits = classifier, logits
        self.num_features = classifier.num_features

    def forward(self, images):
        x = normalize(images[:, 0])
        return self.classifier(x) if self.logits else self.classifier.features(x)


def in_batches(fn, tensor, batch_size=1000):
    return torch.cat([fn(chunk) for chunk in tensor.split(batch_size)])


def build_parser():
    p = ArgumentParser(prog="sample_quality.py", description="Judge generated digits.")
    p.add_argument("--model", required=True, help="VQ-VAE checkpoint")
    p.add_argument("--prior-model", required=True)
    p.add_argument("--classifiers", "--classifier", nargs="+", default=JUDGES, metavar="CKPT",
                   help="judges written by classifier.py (default: the CNN and the MLP judge)")
    p.add_argument("--num-samples", type=positive_int, default=10000)
    p.add_argument("--guidance-scales", type=nonnegative_float, nargs="+", default=[None],
                   metavar="S", help="default: generate.py's default for this prior")
    p.add_argument("--temperatures", type=positive_float, nargs="+", default=[1.0])
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=unit_float, default=1.0)
    p.add_argument("--data-folder", default="data")
    p.add_argument("--test-subset", type=positive_int, default=None,
                   help="the Frechet reference: the first N test images (default: all 10,000)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--json", action="store_true")
    add_vqvae_size_flags(p)
    return p


def baseline_sources(vqvae, train, held_out, device):
    """Images any prior should beat, and the decoder's own ceiling -> {name: (uint8 images
    (n, 1, 28, 28), requested labels or None)}, n the length of the held_out slice."""
    K, n = vqvae.codeBook.K, held_out.stop - held_out.start
    histogram = count_codes(in_batches(vqvae.encode, normalize(train.images[:n])), K)
    return {
        "seed `--input random` (noise through the VQ-VAE)": (to_uint8(in_batches(
            lambda x: vqvae(x)[0], torch.normal(0.5, 0.5, (n, 1, 28, 28), device=device))), None),
        "codes drawn uniformly": (to_uint8(in_batches(
            vqvae.decode, torch.randint(K, (n, 7, 7), device=device))), None),
        "codes drawn from their training histogram": (to_uint8(in_batches(
            vqvae.decode, torch.multinomial(histogram, n * 49, replacement=True).view(n, 7, 7))),
            None),
        "VQ-VAE reconstructions of held-out training images (the prior's ceiling)": (
            to_uint8(in_batches(lambda x: vqvae(x)[0], normalize(train.images[held_out]))),
            train.labels[held_out]),
    }


@torch.no_grad()
def judge_sources(classifier, sources, test_images):
    """-> {source name: {agreement, frechet_distance, inception_score}} under one judge."""
    fid = FrechetInceptionDistance(feature=Judge(classifier), reset_real_features=False)
    fid = fid.to(test_images.device)
    for chunk in test_images.split(1000):
        fid.update(chunk, real=True)
    results = {}
    for name, (images, wanted) in sources.items():
        fid.reset()
        for chunk in images.split(1000):
            fid.update(chunk, real=False)
        score = InceptionScore(feature=Judge(classifier, logits=True)).to(images.device)
        score.update(images)
        predicted = in_batches(Judge(classifier, logits=True), images).argmax(1)
        results[name] = {"agreement": None if wanted is None else
                         (predicted == wanted).float().mean().item(),
                         "frechet_distance": fid.compute().item(),
                         "inception_score": score.compute()[0].item()}
    return results


def main():
    args = build_parser().parse_args()
    warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    vqvae, _ = load_vqvae(args.model, device, "--model", vqvae_sizes(args))
    prior = load_prior(args.prior_model, device, vqvae.codeBook.K)
    judges = {os.path.splitext(os.path.basename(path))[0]: load_classifier(path, device)
              for path in args.classifiers}
    n = args.num_samples
    train = MNISTSplit(args.data_folder, True, device)
    test = MNISTSplit(args.data_folder, False, device, limit=args.test_subset)
    held_out = slice(TRAIN_IMAGES - HOLD_OUT, TRAIN_IMAGES - HOLD_OUT + n)
    labels = torch.arange(n, device=device) % 10
    with torch.no_grad():
        sources = baseline_sources(vqvae, train, held_out, device)
        for scale in args.guidance_scales:
            sampler = sampler_options(prior, args.prior_model, scale, args.top_k, args.top_p)
            for t in args.temperatures:
                name = f"prior, guidance {sampler['guidance_scale']:g}, temperature {t:g}" + \
                    (f", top-k {args.top_k}" if args.top_k else "") + \
                    (f", top-p {args.top_p:g}" if args.top_p < 1 else "")
                sources[name] = (
                    to_uint8(sample_prior(prior, vqvae, labels, temperature=t, **sampler)), labels)
        sources["real: held-out training images (floor)"] = (
            train.images[held_out].unsqueeze(1), train.labels[held_out])
        sources["real: test images (the reference itself)"] = (
            test.images[:n].unsqueeze(1), test.labels[:n])
    test_images = test.images.unsqueeze(1)
    by_judge = {name: judge_sources(c, sources, test_images) for name, c in judges.items()}
    rows = [{"source": name, "images": len(images),
             "judges": {judge: by_judge[judge][name] for judge in judges}}
            for name, (images, _) in sources.items()]
    if args.json:
        print(json.dumps(rows))
        return
    print("| source | " + " | ".join(f"agreement ({j}) | Frechet ({j})" for j in judges) + " |")
    print("| --- |" + " --- | --- |" * len(judges))
    for row in rows:
        cells = []
        for figures in row["judges"].values():
            agreement = figures["agreement"]
            cells += ["—" if agreement is None else f"{100 * agreement:.1f}%",
                      f"{figures['frechet_distance']:.2f}"]
        print(f"| {row['source']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
