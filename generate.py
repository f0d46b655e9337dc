"""Draw a 10x10 grid of images from a trained VQ-VAE checkpoint.

    python generate.py --model models/pretrained/vqvae_mnist.pt --input MNIST --filename recon
    python generate.py --model models/pretrained/vqvae_mnist.pt --input random --filename noise

--input MNIST reconstructs the first 100 test images; --input random passes unit-Gaussian noise images
through the autoencoder, as the seed repo did. The grid goes to generatedImages/<filename>.png.
"""
import os

import torch
from torchvision.utils import save_image

from modules import (MNISTSplit, ArgumentParser, fail, load_vqvae, make_output_dirs,
                     nonnegative_int, positive_int, resolve_device)


def build_parser():
    p = ArgumentParser(prog="generate.py", description="Draw a 10x10 image grid from a checkpoint.")
    p.add_argument("--model", required=True, help="VQ-VAE checkpoint (.pt)")
    p.add_argument("--input", choices=("MNIST", "random"), default="MNIST")
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden-size", "--hidden-size-vae", dest="hidden_size", type=positive_int,
                   default=40, help="only for seed-style checkpoints without a config")
    p.add_argument("--k", type=positive_int, default=512,
                   help="only for seed-style checkpoints without a config")
    p.add_argument("--filename", default="generated", help="writes generatedImages/<filename>.png")
    p.add_argument("--data-folder", default="data", help="for --input MNIST")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    return p


def main():
    parser = build_parser()
    args = parser.parse_args()
    if not args.filename or os.sep in args.filename or (os.altsep and os.altsep in args.filename):
        fail(f"--filename {args.filename!r}: expected a plain file name without a path separator")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    given = {key: getattr(args, key) for key in ("hidden_size", "k")
             if getattr(args, key) != parser.get_default(key)}
    model, _ = load_vqvae(args.model, device, "--model", given)
    if args.input == "MNIST":
        images, _ = next(MNISTSplit(args.data_folder, False, device, limit=100).batches(100))
    else:
        images = torch.normal(mean=0.5, std=0.5, size=(100, 1, 28, 28)).to(device)
    with torch.no_grad():
        generated = model(images)[0]
    make_output_dirs("generatedImages")
    path = os.path.join("generatedImages", f"{args.filename}.png")
    save_image(generated.cpu(), path, nrow=10, normalize=True, value_range=(-1, 1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
