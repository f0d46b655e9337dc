"""Time the original-style training pipeline against the fast path, same model, same process.

    python benchmark.py                          # CPU, batch 128
    python benchmark.py --device cuda --compile --amp --json
    python benchmark.py --full-run               # also time a whole 10-epoch VQ-VAE.py run
    python benchmark.py --prior-samples 10000    # also time 10,000 digits from the committed prior
    python benchmark.py --quantizers fsq lfq simvq   # also the fast path with each quantizer

(a) original-style: torchvision Dataset/DataLoader (PIL decode, ToTensor, Normalize, workers), fp32, eager.
(b) fast path:  the split as uint8 on the device, shuffled there; --amp and --compile when given.
Each is warmed up, then timed over --steps training steps including fetching the batches.
--prior-samples N times generate.py's default sampler drawing and decoding N digits from the
committed VQ-VAE and prior (models/pretrained).
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from checkpoints import PRETRAINED, load_prior, load_vqvae
from cli import (ArgumentParser, add_data_and_device_flags, nonnegative_int, positive_int,
                 resolve_device)
from data import MNISTSplit
from modules import VQVAEConfig, vqvae_from_config
from sampling import sample_prior, sampler_options
from runs import typed_flags
from training import (add_compile_flags, check_compile_flags, loss_weights, make_optimizer,
                      make_precision, maybe_compile, train_step)
from vector_quantizer import QUANTIZERS


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pipeline(args, device, pipeline, amp, compile_model, quantizer="vq"):
    """-> milliseconds per training step, data loading included."""
    torch.manual_seed(0)
    split = MNISTSplit(args.data_folder, True, device, pipeline, args.num_workers)
    model = vqvae_from_config(VQVAEConfig(quantizer=quantizer)).to(device)
    optimizer = make_optimizer(model, 2e-4, device)
    amp_dtype, scaler = make_precision(device, amp)
    if compile_model:
        model = maybe_compile(model, device, args.compile_mode)
    batches = endless_batches(split, args.batch_size)
    for _ in range(args.warmup):
        train_step(model, optimizer, scaler, next(batches)[0], loss_weights(1.0), amp_dtype)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, optimizer, scaler, next(batches)[0], loss_weights(1.0), amp_dtype)
    synchronize(device)
    return (time.perf_counter() - started) / args.steps * 1000


def endless_batches(split, batch_size):
    """Training batches over as many epochs as the warm-up and timed steps take."""
    while True:
        yield from split.batches(batch_size, torch.randperm(len(split)))


def time_full_run(args):
    """Wall time of `VQ-VAE.py` at its defaults (10 epochs, per-epoch evaluation) on the fast path."""
    flags = ["--device", args.device, "--data-folder", os.path.abspath(args.data_folder),
             "--seed", "0", "--output-folder", "benchmark"]
    flags += ["--amp"] * args.amp
    flags += ["--compile", "--compile-mode", args.compile_mode] * args.compile
    with tempfile.TemporaryDirectory() as cwd:
        started = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "VQ-VAE.py"),
                        *flags], cwd=cwd, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started


def time_prior_samples(n, device):
    """-> (seconds to draw and decode n digits, the sampler's options)."""
    vqvae, _ = load_vqvae(os.path.join(PRETRAINED, "vqvae_mnist.pt"), device)
    path = os.path.join(PRETRAINED, "prior_mnist.pt")
    prior = load_prior(path, device, vqvae.codeBook.K)
    sampler = {"temperature": 1.0, **sampler_options(prior, path)}
    labels = torch.arange(n, device=device) % 10
    with torch.no_grad():
        sample_prior(prior, vqvae, labels[:10], **sampler)   # warm-up
        synchronize(device)
        started = time.perf_counter()
        sample_prior(prior, vqvae, labels, **sampler)
        synchronize(device)
    return time.perf_counter() - started, sampler


def main():
    p = ArgumentParser(prog="benchmark.py", description="The original-style pipeline vs the fast path, ms per step.")
    add_data_and_device_flags(p)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--steps", type=positive_int, default=30)
    p.add_argument("--warmup", type=positive_int, default=5)
    p.add_argument("--num-workers", type=nonnegative_int, default=max(os.cpu_count() - 1, 0))
    p.add_argument("--amp", action="store_true", help="VQ-VAE.py's --amp on the fast path")
    add_compile_flags(p, "torch.compile's mode with --compile, on the fast path (VQ-VAE.py's)")
    p.add_argument("--full-run", action="store_true", help="also time a whole 10-epoch run")
    p.add_argument("--prior-samples", type=nonnegative_int, default=0, metavar="N",
                   help="also time drawing N digits from the committed prior")
    p.add_argument("--quantizers", nargs="+", choices=QUANTIZERS, default=[],
                   help="also time the fast path with each of these quantizers (at their defaults)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    check_compile_flags(args, typed_flags(p))
    device = resolve_device(args.device)
    steps_per_epoch = -(-60000 // args.batch_size)
    compiled = f", compile {args.compile_mode}" * args.compile
    rows = {"original-style (torchvision, fp32, eager)": time_pipeline(args, device, "torchvision",
                                                                   False, False),
            f"fast path (device{', amp' * args.amp}{compiled})":
                time_pipeline(args, device, "device", args.amp, args.compile)}
    for quantizer in args.quantizers:
        rows[f"fast path, --quantizer {quantizer}"] = time_pipeline(
            args, device, "device", args.amp, args.compile, quantizer)
    result = {"device": str(device), "gpu": torch.cuda.get_device_name(device)
              if device.type == "cuda" else None, "torch": torch.__version__,
              "batch_size": args.batch_size,
              "rows": [{"pipeline": name, "ms_per_step": ms,
                        "images_per_s": args.batch_size / ms * 1000,
                        "s_per_epoch": ms * steps_per_epoch / 1000} for name, ms in rows.items()]}
    original_ms, fast_ms = list(rows.values())[:2]
    result["speedup"] = original_ms / fast_ms
    if args.full_run:
        result["full_run_s"] = time_full_run(args)
    if args.prior_samples:
        seconds, sampler = time_prior_samples(args.prior_samples, device)
        result["prior_samples"] = {"n": args.prior_samples, "s": seconds, "sampler": sampler,
                                   "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(result))
        return
    print(f"device {result['device']} {result['gpu'] or ''}  torch {result['torch']}  "
          f"batch {args.batch_size}")
    print(f"{'pipeline':50s} {'ms/step':>8s} {'images/s':>9s} {'s/epoch':>8s}")
    for row in result["rows"]:
        print(f"{row['pipeline']:50s} {row['ms_per_step']:8.1f} {row['images_per_s']:9.0f} "
              f"{row['s_per_epoch']:8.1f}")
    print(f"speed-up of the fast path: {result['speedup']:.2f}x")
    if args.full_run:
        print(f"whole default run (10 epochs + per-epoch evaluation): {result['full_run_s']:.1f} s")
    if args.prior_samples:
        report = result["prior_samples"]
        print(f"{report['n']} prior samples, drawn and decoded ({report['sampler']}, "
              f"{report['threads']} threads): {report['s']:.1f} s")


if __name__ == "__main__":
    main()
