"""Draw a 10x10 grid of images from a trained VQ-VAE checkpoint (and a prior over its codes).

    python generate.py --model models/pretrained/vqvae_mnist.pt --input MNIST --filename recon
    python generate.py --model models/pretrained/vqvae_mnist.pt --input random --filename noise
    python generate.py --model models/pretrained/vqvae_mnist.pt --input prior \\
        --prior-model models/pretrained/prior_mnist.pt --filename digits [--digit 3] \\
        [--guidance-scale 2] [--temperature 0.8] [--top-k 50] [--top-p 0.9]

--input MNIST reconstructs the first 100 test images; --input random passes Gaussian noise images
(mean 0.5, std 0.5) through the autoencoder, as the seed repo did; --input prior samples code maps
from the prior, row i of the grid holding digit i (or all --digit), and decodes them
(classifier-free guidance, temperature, top-k and nucleus filtering: `add_sampler_flags`). The grid goes to
generatedImages/<filename>.png. With --num-samples N --samples-out FILE.pt, N prior samples (digit
n % 10 for sample n, or --digit) are also written as a uint8 tensor (N, 1, 28, 28).
"""
import os

import torch

from checkpoints import load_prior, load_vqvae, save_checkpoint
from cli import (ArgumentParser, add_vqvae_size_flags, fail, nonnegative_float, nonnegative_int,
                 positive_float, positive_int, resolve_device, unit_float, vqvae_sizes)
from sampling import DEFAULT_GUIDANCE_SCALE
from data import MNISTSplit, to_uint8
from files import atomic_write, make_output_dirs


def build_parser():
    p = ArgumentParser(prog="generate.py", description="Draw a 10x10 image grid from a checkpoint.")
    p.add_argument("--model", required=True, help="VQ-VAE checkpoint (.pt)")
    p.add_argument("--input", choices=("MNIST", "random", "prior"), default="MNIST")
    p.add_argument("--device", default="cpu")
    p.add_argument("--filename", default="generated", help="writes generatedImages/<filename>.png")
    p.add_argument("--data-folder", default="data", help="for --input MNIST")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    add_vqvae_size_flags(p, "--hidden-size")
    g = p.add_argument_group("prior (--input prior)")
    g.add_argument("--prior-model", help="checkpoint written by pixelcnn_prior.py")
    g.add_argument("--digit", type=int, choices=range(10), metavar="{0..9}", default=None)
    add_sampler_flags(g)
    g.add_argument("--num-samples", type=positive_int, default=None)
    g.add_argument("--samples-out", default=None, help="FILE.pt for the --num-samples samples")
    return p


def add_sampler_flags(parser, temperature=True):
    parser.add_argument("--guidance-scale", type=nonnegative_float, default=None, metavar="S",
                        help="classifier-free guidance: logits u + S (c - u) from the prior's "
                             "unconditional u and conditional c; 1 is none. Default "
                             f"{DEFAULT_GUIDANCE_SCALE} (measured, README), 1 for a prior "
                             "trained without --label-dropout")
    if temperature:
        parser.add_argument("--temperature", type=positive_float, default=1.0)
    parser.add_argument("--top-k", type=positive_int, default=None,
                        help="sample among the K most likely codes only")
    parser.add_argument("--top-p", type=unit_float, default=1.0,
                        help="nucleus sampling: among the most likely codes holding this mass")


def sampler_options(prior, prior_path, scale=None, top_k=None, top_p=1.0):
    """The sampler flags (--guidance-scale None: the default for this prior) -> keyword arguments
    of the prior's `sample` (temperature aside)."""
    if scale is None:
        scale = DEFAULT_GUIDANCE_SCALE if prior.null_label is not None else 1.0
    elif scale != 1.0 and prior.null_label is None:
        fail(f"--guidance-scale {scale}: --prior-model {prior_path} was trained without "
             "--label-dropout, so it has no unconditional half to guide with (use 1)")
    return {"guidance_scale": scale, "top_k": top_k, "top_p": top_p}


def sample_prior(prior, vqvae, labels, batch_size=1000, **sampler):
    """labels (N,) -> decoded images (N, 1, 28, 28) in [-1, 1]; `sampler`: the prior's `sample`'s
    options."""
    return torch.cat([vqvae.decode(prior.sample(y, **sampler)) for y in labels.split(batch_size)])


def main():
    parser = build_parser()
    args = parser.parse_args()
    if not args.filename or os.sep in args.filename or (os.altsep and os.altsep in args.filename):
        fail(f"--filename {args.filename!r}: expected a plain file name without a path separator")
    if args.input == "prior" and not args.prior_model:
        fail("--input prior needs --prior-model, a checkpoint written by pixelcnn_prior.py")
    if (args.num_samples is None) != (args.samples_out is None) or \
            args.num_samples and args.input != "prior":
        fail("--num-samples and --samples-out go together, with --input prior")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model, _ = load_vqvae(args.model, device, "--model", vqvae_sizes(args))
    prior = load_prior(args.prior_model, device, model.codeBook.K) if args.input == "prior" else None
    sampler = {"temperature": args.temperature, **sampler_options(
        prior, args.prior_model, args.guidance_scale, args.top_k, args.top_p)} if prior else None

    def digits(n):
        labels = torch.arange(n, device=device) % 10 if args.digit is None else \
            torch.full((n,), args.digit, device=device)
        return labels

    with torch.no_grad():
        if args.input == "MNIST":
            images, _ = next(MNISTSplit(args.data_folder, False, device, limit=100).batches(100))
            generated = model(images)[0]
        elif args.input == "random":
            generated = model(torch.normal(0.5, 0.5, size=(100, 1, 28, 28)).to(device))[0]
        else:  # row i holds digit i: sample n has digit n // 10 in the grid
            generated = sample_prior(prior, model, digits(100).view(10, 10).t().flatten(),
                                     **sampler)
        if args.num_samples:
            samples = to_uint8(sample_prior(prior, model, digits(args.num_samples), **sampler)).cpu()
    make_output_dirs("generatedImages")
    path = os.path.join("generatedImages", f"{args.filename}.png")
    from torchvision.utils import save_image   # here: torchvision's import costs seconds
    with atomic_write(path) as f:  # another process may be writing the same grid
        save_image(generated.cpu(), f, format="png", nrow=10, normalize=True, value_range=(-1, 1))
    print(f"wrote {path}")
    if args.num_samples:
        save_checkpoint(args.samples_out, samples)
        print(f"wrote {args.samples_out}: {tuple(samples.shape)} uint8")


if __name__ == "__main__":
    main()
