"""Train a class-conditional prior over the 7x7 code maps of a trained VQ-VAE: a Gated PixelCNN
(gated_pixelcnn.py) or a small causal transformer (--arch transformer, code_transformer.py).

    python pixelcnn_prior.py --vqvae-model models/pretrained/vqvae_mnist.pt --output-folder prior
    python pixelcnn_prior.py --vqvae-model models/pretrained/vqvae_mnist.pt --arch transformer \\
        --num-layers 4 --hidden-size 192 --lr 5e-4 --output-folder prior_transformer
    python generate.py --model models/pretrained/vqvae_mnist.pt --input prior \\
        --prior-model models/prior/best.pt --filename prior_samples

The codes of the training and test sets are extracted once, on the chosen device. The loss is the
negative log-likelihood of the code maps: reported in nats per code map (49 codes) and bits per code.
Writes logs/<output-folder>/ and models/<output-folder>/{best,last}.pt (kind 'prior').
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from checkpoints import load_optimizer_state, load_state, load_vqvae
from cli import (ArgumentParser, add_vqvae_size_flags, fail, fraction, nonnegative_int,
                 positive_float, positive_int, resolve_device, vqvae_sizes)
from data import MNISTSplit, image_grid
from modules import PRIORS, prior_from_config
from runs import TrainingRun, parse_run_args, rng_state, seed_everything, set_rng_state
from training import LR_SCHEDULES, make_optimizer, make_scheduler

TRAIN_SCALARS = ("loss/train/nll_nats_per_map", "loss/train/bits_per_code")
LOCKED_ON_RESUME = ("arch", "heads", "num_layers", "hidden_size", "batch_size", "lr",
                    "lr_schedule", "seed", "train_subset", "dropout", "label_dropout", "ema_decay")
# A run started before these flags existed trained without them: resumed, it goes on so.
BEFORE_FLAGS = {"arch": "gated_pixelcnn", "dropout": 0.0, "label_dropout": 0.0, "ema_decay": 0.0}


@torch.no_grad()
def extract_codes(vqvae, split):
    """-> codes (N, 7, 7) int64 and labels (N,), both on the split's device."""
    codes, labels = zip(*[(vqvae.encode(images), y) for images, y in split.batches(1000)])
    return torch.cat(codes), torch.cat(labels)


@torch.no_grad()
def test_nll(prior, codes, labels, batch_size=1000):
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
    p.add_argument("--data-folder", default="data")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--num-epochs", type=nonnegative_int, default=10)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                   help="cosine decays the learning rate to 0 over the run")
    p.add_argument("--arch", choices=PRIORS, default="gated_pixelcnn")
    p.add_argument("--num-layers", type=positive_int, default=12)
    p.add_argument("--hidden-size", type=positive_int, default=64, help="channels; the transformer's "
                   "width (a multiple of --heads)")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads (transformer)")
    p.add_argument("--dropout", type=fraction, default=0.1,
                   help="dropout in every layer (Gated PixelCNN: on its gated outputs; transformer: "
                        "on attention weights, attention and MLP outputs)")
    p.add_argument("--label-dropout", type=fraction, default=0.1,
                   help="fraction of training maps shown with the null label instead of their "
                        "digit, so the prior is also unconditional (generate.py --guidance-scale); "
                        "0 trains a conditional-only prior")
    p.add_argument("--ema-decay", type=fraction, default=0.999,
                   help="checkpoints hold this exponential moving average of the weights; 0: the "
                        "weights themselves")
    p.add_argument("--output-folder", default="prior")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--resume", default=None, help="continue from a last.pt of this script")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run of this name")
    p.add_argument("--train-subset", type=positive_int, default=None)
    p.add_argument("--test-subset", type=positive_int, default=None)
    p.add_argument("--log-every", type=positive_int, default=50)
    add_vqvae_size_flags(p)
    return p


def parse_args(argv=None):
    """On --resume, flags not typed (--vqvae-model too) take the run's values."""
    args, checkpoint = parse_run_args(build_parser(), "prior", LOCKED_ON_RESUME, argv)
    for key, value in BEFORE_FLAGS.items():
        if checkpoint and key not in checkpoint["config"]:
            setattr(args, key, value)
    if not args.vqvae_model:
        fail("--vqvae-model is required: the VQ-VAE checkpoint whose codes the prior models")
    if args.arch == "transformer" and args.hidden_size % args.heads:
        fail(f"--hidden-size {args.hidden_size}: the transformer's width must be a multiple of "
             f"--heads {args.heads}")
    return args, checkpoint


def main(args, checkpoint=None):
    device = resolve_device(args.device)
    vqvae, _ = load_vqvae(args.vqvae_model, device, "--vqvae-model", vqvae_sizes(args))
    shuffle = seed_everything(args.seed)
    train_codes, train_labels = extract_codes(
        vqvae, MNISTSplit(args.data_folder, True, device, limit=args.train_subset))
    test_codes, test_labels = extract_codes(
        vqvae, MNISTSplit(args.data_folder, False, device, limit=args.test_subset))
    K = vqvae.codeBook.K
    config = {**{k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}, "k": K}
    prior = prior_from_config(config).to(device)
    # The weights that are evaluated, saved and sampled: the average, or the weights themselves.
    ema_prior = copy.deepcopy(prior).requires_grad_(False).eval() if args.ema_decay else prior
    optimizer = make_optimizer(prior, args.lr, device)
    n = len(train_codes)
    steps_per_epoch = -(-n // args.batch_size)
    scheduler = make_scheduler(optimizer, args.lr_schedule, args.num_epochs * steps_per_epoch)
    start_epoch, step, batch_in_epoch, best = 0, 0, 0, float("inf")
    if checkpoint:
        load_state(prior, checkpoint.get("training_state_dict", checkpoint["state_dict"]),
                   "--resume", args.resume)
        load_state(ema_prior, checkpoint["state_dict"], "--resume", args.resume)
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        if scheduler and checkpoint.get("scheduler"):
            scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"], shuffle)
        start_epoch, step, best = checkpoint["epoch"], checkpoint["step"], checkpoint["best_nll"]
        batch_in_epoch = checkpoint.get("batch_in_epoch", 0)
    run = TrainingRun("pixelcnn_prior.py", args.output_folder, args.resume, args.overwrite,
                      args.log_every, device=device)

    def checkpoint_dict(epoch, batch, shuffle_state, metrics):
        weights = {"state_dict": ema_prior.state_dict()}
        if ema_prior is not prior:
            weights["training_state_dict"] = prior.state_dict()
        return {"kind": "prior", **weights, "config": config,
                "epoch": epoch, "batch_in_epoch": batch, "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler else None,
                "rng": {**rng_state(shuffle), "shuffle": shuffle_state}, "best_nll": best,
                "metrics": metrics}

    writer = SummaryWriter(run.log_dir)
    print(f"prior {args.output_folder}: {len(train_codes)} train / {len(test_codes)} test code maps, "
          f"K {K}, device {device}; uniform bound {49 * math.log2(K):.0f} bits per map")
    digits = torch.arange(10, device=device).repeat_interleave(8)
    for epoch in range(start_epoch, args.num_epochs):
        shuffle_state = shuffle.get_state()
        order = torch.randperm(n, generator=shuffle).to(device)
        for i in tqdm(range(batch_in_epoch * args.batch_size, n, args.batch_size), leave=False,
                      desc=f"epoch {epoch + 1}", total=steps_per_epoch, initial=batch_in_epoch):
            idx = order[i:i + args.batch_size]
            codes, labels = train_codes[idx], train_labels[idx]
            if args.label_dropout:
                dropped = torch.rand(labels.shape, device=device) < args.label_dropout
                labels = labels.masked_fill(dropped, prior.null_label)
            loss = F.cross_entropy(prior(codes, labels), codes)          # nats per code
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler:
                scheduler.step()
            if ema_prior is not prior:
                update_ema(ema_prior, prior, args.ema_decay, step)
            run.record(torch.stack([49 * loss.detach(), loss.detach() / math.log(2)]))
            step += 1
            batch_in_epoch += 1
            if run.sync_due(step, batch_in_epoch == steps_per_epoch):
                _, signum = run.sync(step, writer, TRAIN_SCALARS)
                if signum:
                    run.stop(signum, step, checkpoint_dict(epoch, batch_in_epoch, shuffle_state,
                                                           None))
        batch_in_epoch = 0
        nats = test_nll(ema_prior, test_codes, test_labels)
        writer.add_scalar("loss/test/nll_nats_per_map", 49 * nats, epoch + 1)
        writer.add_scalar("loss/test/bits_per_code", nats / math.log(2), epoch + 1)
        if ema_prior is not prior:  # what the average buys
            writer.add_scalar("loss/test/bits_per_code_without_ema",
                              test_nll(prior, test_codes, test_labels) / math.log(2), epoch + 1)
        samples = vqvae.decode(ema_prior.eval().sample(digits))
        prior.train()
        writer.add_image("samples", image_grid(samples), epoch + 1)
        writer.flush()
        metrics = {"test_nll_nats_per_map": 49 * nats, "test_bits_per_map": 49 * nats / math.log(2)}
        if nats < best:  # chosen by test NLL, never by a judge of the samples
            best = nats
            run.save("best.pt", checkpoint_dict(epoch + 1, 0, shuffle.get_state(), metrics))
        run.save("last.pt", checkpoint_dict(epoch + 1, 0, shuffle.get_state(), metrics))
        print(f"epoch {epoch + 1}/{args.num_epochs}  test NLL {49 * nats:.2f} nats = "
              f"{metrics['test_bits_per_map']:.1f} bits per code map "
              f"({nats / math.log(2):.3f} bits per code)")
    writer.close()


if __name__ == "__main__":
    main(*parse_args())
