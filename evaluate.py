"""Measure a VQ-VAE checkpoint on the whole MNIST test set, in eval mode.

    python evaluate.py --model models/pretrained/vqvae_mnist.pt [--json]

Reports reconstruction MSE on the [-1, 1] scale the model trains on, PSNR in dB on the [0, 1] pixel
scale (10 log10(1 / MSE_01) with MSE_01 = MSE / 4), codes used, codebook perplexity, and what one 7x7
code map costs in bits: 49 log2 K for a uniform code, 49 H(p) at the measured code entropy.
"""
import json
import math

from checkpoints import load_vqvae
from cli import (ArgumentParser, add_data_and_device_flags, add_vqvae_size_flags, positive_int,
                 resolve_device, vqvae_sizes)
from data import MNISTSplit
from training import evaluate_vqvae


def measure(model, split):
    metrics = evaluate_vqvae(model, split)
    K = model.codeBook.K
    mse = metrics["reconstruction"]
    return {"test_mse": mse, "psnr_db": 10 * math.log10(4 / mse),
            "codes_used": metrics["codes_used"], "k": K, "perplexity": metrics["perplexity"],
            "bits_per_map_uniform": 49 * math.log2(K),
            "bits_per_map_entropy": 49 * math.log2(metrics["perplexity"]),
            "test_images": len(split)}


def main():
    p = ArgumentParser(prog="evaluate.py", description="Test-set metrics of a VQ-VAE checkpoint.")
    p.add_argument("--model", required=True)
    add_data_and_device_flags(p)
    p.add_argument("--test-subset", type=positive_int, default=None, help="first N test images")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_vqvae_size_flags(p)
    args = p.parse_args()
    device = resolve_device(args.device)
    model, _ = load_vqvae(args.model, device, "--model", vqvae_sizes(args))
    result = measure(model, MNISTSplit(args.data_folder, False, device, limit=args.test_subset))
    if args.json:
        print(json.dumps(result))
        return
    print(f"model                 {args.model}")
    print(f"test images           {result['test_images']}")
    print(f"test MSE ([-1, 1])    {result['test_mse']:.5f}")
    print(f"PSNR ([0, 1])         {result['psnr_db']:.2f} dB")
    print(f"codes used            {result['codes_used']} / {result['k']}")
    print(f"perplexity            {result['perplexity']:.1f}")
    print(f"bits per code map     {result['bits_per_map_entropy']:.1f} at the code entropy, "
          f"{result['bits_per_map_uniform']:.1f} uniform")


if __name__ == "__main__":
    main()
