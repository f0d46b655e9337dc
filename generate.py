"""Draw a 10x10 grid of images from a trained VQ-VAE checkpoint (and a prior over its codes).

    python generate.py --model models/pretrained/vqvae_mnist.pt --input MNIST --filename recon
    python generate.py --model models/pretrained/vqvae_mnist.pt --input random --filename noise
    python generate.py --model models/pretrained/vqvae_mnist.pt --input prior \\
        --prior-model models/pretrained/prior_mnist.pt --filename digits [--digit 3] \\
        [--guidance-scale 2] [--temperature 0.8] [--top-k 50] [--top-p 0.9] [--keep 0.8]

--input MNIST reconstructs the first 100 test images; --input random passes Gaussian noise images
(mean 0.5, std 0.5) through the autoencoder, as the original repo did; --input prior samples code maps
from the prior, row i of the grid holding digit i (or all --digit), and decodes them
(--temperature, and `sampling.add_sampler_flags`: classifier-free guidance, over an interval of
positions if asked, top-k and nucleus filtering, rejection by the prior's own evidence for the
digit). The grid goes to generatedImages/<filename>.png. With --num-samples N --samples-out
FILE.pt, N prior samples (digit n % 10 for sample n, or --digit) are also written as a uint8
tensor (N, 1, 28, 28).
"""
import os

import torch

from checkpoints import load_prior, load_vqvae, save_checkpoint
from cli import (ArgumentParser, add_vqvae_size_flags, fail, int_between, positive_float,
                 resolve_device, seed_int, vqvae_sizes)
from data import MNISTSplit, to_uint8
from files import check_file_to_write, make_output_dirs
from image_grids import save_grid
from sampling import add_sampler_flags, sample_prior, sampler_options


def build_parser():
    p = ArgumentParser(prog="generate.py", description="Draw a 10x10 image grid from a checkpoint.")
    p.add_argument("--model", required=True, help="VQ-VAE checkpoint (.pt)")
    p.add_argument("--input", choices=("MNIST", "random", "prior"), default="MNIST")
    p.add_argument("--device", default="cpu")
    p.add_argument("--filename", default="generated", help="writes generatedImages/<filename>.png")
    p.add_argument("--data-folder", default="data", help="for --input MNIST")
    p.add_argument("--seed", type=seed_int, default=0)
    add_vqvae_size_flags(p, "--hidden-size")
    g = p.add_argument_group("prior (--input prior)")
    g.add_argument("--prior-model", help="checkpoint written by pixelcnn_prior.py")
    g.add_argument("--digit", type=int, choices=range(10), metavar="{0..9}", default=None)
    g.add_argument("--temperature", type=positive_float, default=1.0)
    add_sampler_flags(g)
    g.add_argument("--num-samples", type=int_between(1, 1_000_000), default=None,
                   help="also draw N samples into --samples-out (at most 1,000,000: hours on a CPU)")
    g.add_argument("--samples-out", default=None,
                   help="a new FILE.pt for the --num-samples samples (an existing file is kept)")
    p.prior_only = g._group_actions  # argparse keeps a group's actions only privately
    return p


def main():
    parser = build_parser()
    args = parser.parse_args()
    if not args.filename or os.sep in args.filename or (os.altsep and os.altsep in args.filename):
        fail(f"--filename {args.filename!r}: expected a plain file name without a path separator")
    check_file_to_write(os.path.join("generatedImages", f"{args.filename}.png"), "--filename")
    if args.input == "prior" and not args.prior_model:
        fail("--input prior needs --prior-model, a checkpoint written by pixelcnn_prior.py")
    if (args.num_samples is None) != (args.samples_out is None) or \
            args.num_samples and args.input != "prior":
        fail("--num-samples and --samples-out go together, with --input prior")
    if args.samples_out is not None:
        check_file_to_write(args.samples_out, "--samples-out", may_exist=False)
    ignored = [a.option_strings[0] for a in parser.prior_only if getattr(args, a.dest) != a.default]
    if args.input != "prior" and ignored:  # a flag with no effect must not pass for one obeyed
        fail(f"{ignored[0]} applies to --input prior only; --input {args.input} draws no samples "
             f"from a prior")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model, _ = load_vqvae(args.model, device, "--model", vqvae_sizes(args))
    prior = load_prior(args.prior_model, device, model.codeBook.K, vqvae_path=args.model) \
        if args.input == "prior" else None
    sampler = {"temperature": args.temperature, **sampler_options(
        prior, args.prior_model, args.guidance_scale, args.top_k, args.top_p,
        args.guidance_interval, args.keep)} if prior else None

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
    # every folder made before any file is written: a refusal leaves no grid without its samples
    make_output_dirs("generatedImages", *([os.path.dirname(args.samples_out) or "."]
                                          if args.num_samples else []))
    path = os.path.join("generatedImages", f"{args.filename}.png")
    save_grid(generated, path)
    print(f"wrote {path}")
    if args.num_samples:
        try:   # checked above, and claimed here: a file another process wrote meanwhile is kept
            save_checkpoint(args.samples_out, samples, replace=False)
        except FileExistsError:
            fail(f"--samples-out {args.samples_out}: exists (written a moment ago by another "
                 f"process); give a new name or delete it first")
        print(f"wrote {args.samples_out}: {tuple(samples.shape)} uint8")


if __name__ == "__main__":
    main()
