"""Train a class-conditional prior over the 7x7 code maps of a trained VQ-VAE: a Gated PixelCNN
(gated_pixelcnn.py) or a small causal transformer (--arch transformer, code_transformer.py).

    python pixelcnn_prior.py --vqvae-model models/pretrained/vqvae_mnist.pt --output-folder prior
    python pixelcnn_prior.py --vqvae-model models/pretrained/vqvae_mnist.pt --arch transformer \\
        --num-layers 4 --channels 192 --lr 5e-4 --output-folder prior_transformer
    python generate.py --model models/pretrained/vqvae_mnist.pt --input prior \\
        --prior-model models/prior/best.pt --filename prior_samples

The codes are extracted once, on the chosen device: the first 50,000 training images' to learn
from (with --shift-augment R, also those of every shift of them by up to R pixels), the last
10,000 (--hold-out) to choose best.pt by, the test images' to report. The loss is the
negative log-likelihood of the code maps: reported in nats or bits per code map (49 codes) and bits
per code. Writes logs/<output-folder>/ and models/<output-folder>/{best,last}.pt (kind 'prior').
"""
import argparse
import copy
import math
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import load_vqvae, run_settings, same_weights
from cli import (ArgumentParser, add_data_and_device_flags, add_vqvae_size_flags, fail, fraction,
                 nonnegative_int, positive_float, positive_int, renamed, resolve_device,
                 seed_int, vqvae_sizes)
from data import HOLD_OUT, MNISTSplit, check_training_split, training_slices
from image_grids import image_grid
from priors import PRIORS, prior_from_config, saved_config
from runs import (TrainingRun, add_run_flags, parse_run_args, resume_is_complete,
                  seed_everything)
from training import LR_SCHEDULES, make_optimizer, make_scheduler

TRAIN_SCALARS = ("loss/train/nll_nats_per_map", "loss/train/bits_per_code")
LOCKED_ON_RESUME = ("arch", "heads", "num_layers", "channels", "batch_size", "lr",
                    "lr_schedule", "seed", "train_subset", "dropout", "label_dropout", "ema_decay",
                    "hold_out", "shift_augment")
# A run started before these flags existed trained without them: resumed, it goes on so.
BEFORE_FLAGS = {"arch": "gated_pixelcnn", "dropout": 0.0, "label_dropout": 0.0, "ema_decay": 0.0,
                "hold_out": 0, "shift_augment": 0}
RENAMED = {"hidden_size": "channels"}  # the prior's old --hidden-size


@torch.no_grad()
def extract_codes(vqvae, split, shift=(0, 0)):
    """-> codes (N, 7, 7) int64 and labels (N,), both on the split's device, of the images shifted
    by `shift` (rows, columns) pixels. Rolled, so ink at an edge wraps round: for a one-pixel shift
    that touches 1.4% of the training images, whose outer ring of pixels is not empty."""
    codes, labels = zip(*[(vqvae.encode(images.roll(shift, dims=(2, 3))), y)
                          for images, y in split.batches(1000)])
    return torch.cat(codes), torch.cat(labels)


def pixel_shifts(r):
    """The (2r + 1)^2 shifts by up to r pixels each way, the unshifted first: index i is the
    prior's shift label i (`GatedPixelCNN.shift_embedding`)."""
    around = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy or dx]
    return [(0, 0)] + around


@torch.no_grad()
def mean_nll(prior, codes, labels, batch_size=1000):
    """Mean negative log-likelihood in nats per code, given the true digits (no guidance)."""
    was_training = prior.training
    prior.eval()
    total = sum(F.cross_entropy(prior(c, y), c, reduction="sum")
                for c, y in zip(codes.split(batch_size), labels.split(batch_size)))
    prior.train(was_training)
    return total.item() / codes.numel()


@torch.no_grad()
def update_ema(ema_prior, prior, decay, step):
    """ema <- ema + (1 - d) (weights - ema), in place; d ramps up as (1 + step) / (10 + step) so the
    random initial weights are forgotten early (a Polyak average of the recent weights)."""
    d = min(decay, (1 + step) / (10 + step))
    for average, weight in zip(ema_prior.parameters(), prior.parameters()):
        average.lerp_(weight, 1 - d)


def build_parser():
    p = ArgumentParser(prog="pixelcnn_prior.py", description="Train a prior over code maps.")
    p.add_argument("--vqvae-model", help="VQ-VAE checkpoint whose codes are modelled (required; "
                   "on --resume, the run's)")
    add_data_and_device_flags(p)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--num-epochs", type=positive_int, default=10)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                   help="cosine decays the learning rate to 0 over the run")
    p.add_argument("--arch", choices=sorted(PRIORS), default="gated_pixelcnn")
    p.add_argument("--num-layers", type=positive_int, default=12)
    p.add_argument("--channels", type=positive_int, default=64,
                   help="channels per position: the Gated PixelCNN's stacks, the transformer's "
                        "width (a multiple of --heads)")
    p.add_argument("--hidden-size", type=renamed("--channels"), help=argparse.SUPPRESS)
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads (transformer)")
    p.add_argument("--dropout", type=fraction, default=0.1,
                   help="dropout in every layer (Gated PixelCNN: on its gated outputs; transformer: "
                        "on attention weights, attention and MLP outputs)")
    p.add_argument("--label-dropout", type=fraction, default=0.1,
                   help="fraction of training maps shown with the null label instead of their "
                        "digit, so the prior is also unconditional (generate.py --guidance-scale); "
                        "0 trains a conditional-only prior")
    p.add_argument("--shift-augment", type=nonnegative_int, default=0,
                   help="also train on the maps of the training images shifted by up to this many "
                        "pixels each way, telling the prior the shift; it models, samples and is "
                        "scored on unshifted maps (Gated PixelCNN only)")
    p.add_argument("--ema-decay", type=fraction, default=0.999,
                   help="checkpoints hold this exponential moving average of the weights; 0: the "
                        "weights themselves")
    p.add_argument("--output-folder", default="prior")
    p.add_argument("--seed", type=seed_int, default=0)
    add_run_flags(p, "maps", HOLD_OUT)  # --hold-out 0: train on all, best.pt is the last epoch
    add_vqvae_size_flags(p)
    return p


def parse_args(argv=None):
    """On --resume, flags not typed (--vqvae-model too) take the run's values."""
    args, checkpoint = parse_run_args(build_parser(), "prior", LOCKED_ON_RESUME, argv, RENAMED,
                                      BEFORE_FLAGS)
    if not args.vqvae_model:
        fail("--vqvae-model is required: the VQ-VAE checkpoint whose codes the prior models")
    trained_over = checkpoint and run_settings(checkpoint).get("vqvae_model")
    if trained_over and args.vqvae_model != trained_over:
        check_same_vqvae(args.vqvae_model, trained_over, args.resume)
    check_training_split(args.hold_out, args.train_subset)
    if args.arch == "transformer" and args.channels % args.heads:
        fail(f"--channels {args.channels}: the transformer's width must be a multiple of "
             f"--heads {args.heads}")
    if args.arch == "transformer" and args.shift_augment:
        fail(f"--shift-augment {args.shift_augment}: only the Gated PixelCNN prior takes it")
    if args.shift_augment > 3:
        fail(f"--shift-augment {args.shift_augment}: expected at most 3 pixels (MNIST's digits "
             f"fit a 20 x 20 box in the 28 x 28 image)")
    return args, checkpoint


def check_same_vqvae(path, trained_over, resume):
    """A resumed prior goes on over the codes it learned: a typed --vqvae-model may name the run's
    VQ-VAE at another path (another machine), not another VQ-VAE."""
    if not os.path.isfile(trained_over):
        print(f"warning: --resume {resume} was trained over {trained_over}, which is not here; "
              f"going on over --vqvae-model {path}, which must be that VQ-VAE", file=sys.stderr)
        return
    if not same_weights(path, "--vqvae-model", trained_over, f"--resume {resume}'s VQ-VAE"):
        fail(f"--vqvae-model {path}: --resume {resume} is a prior over the codes of "
             f"{trained_over}, whose weights differ; resume over that VQ-VAE or train a new prior")


def model_config(args, K):
    _, config = PRIORS[args.arch]
    width = {"channels": args.channels, "shift_augment": args.shift_augment} \
        if args.arch == "gated_pixelcnn" else {"width": args.channels, "heads": args.heads}
    return config(k=K, num_layers=args.num_layers, dropout=args.dropout,
                  unconditional=args.label_dropout > 0, **width)


def main(args, checkpoint=None):
    if resume_is_complete(args, checkpoint):   # nothing read, nothing written
        return
    device = resolve_device(args.device)
    vqvae, _ = load_vqvae(args.vqvae_model, device, "--vqvae-model", vqvae_sizes(args))
    shuffle = seed_everything(args.seed)
    fit, held_out = training_slices(args.data_folder, device, args.hold_out, args.train_subset)
    extracted = [extract_codes(vqvae, fit, shift) for shift in pixel_shifts(args.shift_augment)]
    train_codes = torch.stack([codes for codes, _ in extracted])   # (shifts, N, 7, 7), unshifted 1st
    train_labels = extracted[0][1]
    held_out_codes = extract_codes(vqvae, held_out) if held_out else None
    test_codes = extract_codes(vqvae, MNISTSplit(args.data_folder, False, device,
                                                 limit=args.test_subset))
    config = model_config(args, vqvae.codeBook.K)
    prior = prior_from_config(config).to(device)
    # The weights that are evaluated, saved and sampled: the average, or the weights themselves.
    ema_prior = copy.deepcopy(prior).requires_grad_(False).eval() if args.ema_decay else prior
    optimizer = make_optimizer(prior, args.lr, device)
    shifts, n = train_codes.shape[:2]
    steps_per_epoch = -(-n // args.batch_size)
    scheduler = make_scheduler(optimizer, args.lr_schedule, args.num_epochs * steps_per_epoch)
    state = {"state_dict": ema_prior, "optimizer": optimizer, "scheduler": scheduler}
    if ema_prior is not prior:
        state["training_state_dict"] = prior
    with TrainingRun("pixelcnn_prior.py", "prior", args, saved_config(config), state, checkpoint,
                     shuffle, TRAIN_SCALARS, device=device) as run:
        print(f"prior {args.output_folder}: {n} train{f' x {shifts} shifts' if shifts > 1 else ''}"
              f" / {len(held_out_codes[0]) if held_out else 0} held-out / {len(test_codes[0])} "
              f"test code maps, K {config.k}, device {device}; "
              f"uniform bound {49 * math.log2(config.k):.0f} bits per map")
        digits = torch.arange(10, device=device).repeat_interleave(8)
        for epoch in run.epochs(args.num_epochs, steps_per_epoch):
            # batch
            order = run.shuffled(n).to(device)
            for i in tqdm(range(run.batch_in_epoch * args.batch_size, n, args.batch_size),
                          leave=False, desc=f"epoch {epoch + 1}", total=steps_per_epoch,
                          initial=run.batch_in_epoch):
                idx = order[i:i + args.batch_size]
                shift = torch.randint(shifts, idx.shape, device=device) if shifts > 1 else None
                codes = train_codes[0 if shift is None else shift, idx]
                labels = train_labels[idx]
                if args.label_dropout:
                    dropped = torch.rand(labels.shape, device=device) < args.label_dropout
                    labels = labels.masked_fill(dropped, prior.null_label)
                # step
                logits = prior(codes, labels) if shift is None else prior(codes, labels, shift)
                loss = F.cross_entropy(logits, codes)                        # nats per code
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler:
                    scheduler.step()
                if ema_prior is not prior:
                    update_ema(ema_prior, prior, args.ema_decay, run.step)
                # log
                run.step_done(torch.stack([49 * loss.detach(), loss.detach() / math.log(2)]))
            # evaluate: held-out maps choose, test maps report
            metrics = evaluate(run.writer, prior, ema_prior, vqvae, held_out_codes, test_codes,
                               digits, epoch + 1)
            # save: best.pt (lowest held-out NLL; the last epoch without a hold-out), last.pt
            run.save_epoch(metrics, metrics.get("held_out_bits_per_map", float(-epoch)))
            held = f"held-out {metrics['held_out_bits_per_map']:.1f}, " if held_out else ""
            print(f"epoch {epoch + 1}/{args.num_epochs}  NLL in bits per code map: {held}test "
                  f"{metrics['test_bits_per_map']:.1f} ({metrics['test_nll_nats_per_map']:.2f} "
                  f"nats)")


def evaluate(writer, prior, ema_prior, vqvae, held_out_codes, test_codes, digits, epoch):
    """NLL of the held-out and test maps (and, with a moving average, what it buys), and samples,
    to TensorBoard -> the metrics a checkpoint records."""
    nats = mean_nll(ema_prior, *test_codes)
    metrics = {"test_nll_nats_per_map": 49 * nats, "test_bits_per_map": 49 * nats / math.log(2)}
    writer.add_scalar("loss/test/nll_nats_per_map", 49 * nats, epoch)
    writer.add_scalar("loss/test/bits_per_code", nats / math.log(2), epoch)
    if held_out_codes:
        held_out = mean_nll(ema_prior, *held_out_codes)
        metrics["held_out_bits_per_map"] = 49 * held_out / math.log(2)
        writer.add_scalar("loss/held_out/bits_per_code", held_out / math.log(2), epoch)
    if ema_prior is not prior:
        writer.add_scalar("loss/test/bits_per_code_without_ema",
                          mean_nll(prior, *test_codes) / math.log(2), epoch)
    samples = vqvae.decode(ema_prior.eval().sample(digits))
    prior.train()
    writer.add_image("samples", image_grid(samples), epoch)
    writer.flush()
    return metrics


if __name__ == "__main__":
    main(*parse_args())
