"""Train the VQ-VAE on MNIST.

    python VQ-VAE.py --output-folder vqvae                 # README defaults, CPU
    python VQ-VAE.py --device cuda --compile               # GPU
    python VQ-VAE.py --resume models/vqvae/last.pt         # continue an interrupted run
    torchrun --nproc_per_node=2 VQ-VAE.py ...              # DistributedDataParallel

Writes TensorBoard logs to logs/<output-folder>/ and checkpoints to models/<output-folder>/:
best.pt (lowest test reconstruction loss), model_<epoch>.pt and last.pt (everything needed to resume).
"""
import multiprocessing as mp
import os
import random
import time
import warnings

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from checkpoints import load_optimizer_state, load_state
from cli import (ArgumentParser, decay_float, fail, nonnegative_float, nonnegative_int,
                 positive_float, positive_int, resolve_device)
from data import MNISTSplit, image_grid
from modules import DEFAULT_CONFIG, vqvae_from_config
from runs import (TrainingRun, end_distributed, parse_run_args, rng_state, seed_everything,
                  set_rng_state)
from training import (LR_SCHEDULES, code_usage, evaluate_vqvae, make_optimizer, make_precision,
                      make_scheduler, maybe_compile, train_step)
from vector_quantizer import CODEBOOK_INITS, CODEBOOKS, GRADIENTS

# A --resume must agree with the checkpoint on these; others (device, epochs at a constant learning
# rate, ...) may be changed.
LOCKED_ON_RESUME = ("hidden_size", "k", "codebook", "codebook_init", "ema_decay",
                    "dead_code_threshold", "gradient", "conv_init_scale", "latent_init_scale",
                    "batch_size", "lr", "lr_schedule", "beta", "seed", "train_subset", "amp")
TRAIN_SCALARS = ("loss/train/training_loss", "loss/train/reconstruction", "loss/train/quantization",
                 "loss/train/commitment", "codebook/train/perplexity", "codebook/train/codes_used")


def build_parser():
    p = ArgumentParser(prog="VQ-VAE.py", description="Train a VQ-VAE on MNIST.")
    p.add_argument("--output-folder", default="vqvae", help="run name: logs/<name>, models/<name>")
    p.add_argument("--data-folder", default="data", help="MNIST goes to <folder>/MNIST/raw")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--hidden-size", type=positive_int, default=DEFAULT_CONFIG["hidden_size"],
                   help="latent/codeword size D")
    p.add_argument("--k", type=positive_int, default=DEFAULT_CONFIG["k"],
                   help="number of codewords K")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--num-epochs", "--num_epoch", dest="num_epochs", type=nonnegative_int, default=10)
    p.add_argument("--lr", type=positive_float, default=2e-4, help="Adam learning rate")
    p.add_argument("--beta", type=positive_float, default=1.0, help="commitment loss weight")
    p.add_argument("--num-workers", type=nonnegative_int, default=max(mp.cpu_count() - 1, 0),
                   help="DataLoader workers (torchvision pipeline only)")
    p.add_argument("--seed", type=nonnegative_int, default=None, help="default: drawn and recorded")
    g = p.add_argument_group("codebook")
    g.add_argument("--codebook", choices=CODEBOOKS, default=DEFAULT_CONFIG["codebook"])
    g.add_argument("--codebook-init", choices=CODEBOOK_INITS,
                   default=DEFAULT_CONFIG["codebook_init"])
    g.add_argument("--ema-decay", type=decay_float, default=DEFAULT_CONFIG["ema_decay"])
    g.add_argument("--dead-code-threshold", type=nonnegative_float,
                   default=DEFAULT_CONFIG["dead_code_threshold"],
                   help="re-seed codes used fewer times per batch (EMA) than this; 0 disables")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                   default=DEFAULT_CONFIG["lr_schedule"])
    g.add_argument("--gradient", choices=GRADIENTS, default=DEFAULT_CONFIG["gradient"],
                   help="how the decoder's gradient crosses the quantizer (seed: straight-through)")
    g = p.add_argument_group("initialisation (1 and 1: the seed's Xavier init)")
    g.add_argument("--conv-init-scale", type=positive_float,
                   default=DEFAULT_CONFIG["conv_init_scale"],
                   help="convolutions followed by BatchNorm start at this times their Xavier init")
    g.add_argument("--latent-init-scale", type=positive_float,
                   default=DEFAULT_CONFIG["latent_init_scale"],
                   help="the encoder output z_e(x) starts at this times its Xavier-init scale")
    g = p.add_argument_group("speed")
    g.add_argument("--data-pipeline", choices=("device", "torchvision"), default="device",
                   help="device: whole split as uint8 on the device; torchvision: the seed's loader")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision fitting the hardware: bf16 on GPUs of compute capability "
                        "8.0+ (A100, H100, H200, RTX 30xx+) and on CPUs with AVX512-BF16/AMX; fp16 "
                        "with loss scaling on older GPUs (T4, V100); float32 with a warning on "
                        "other CPUs. The quantizer's distances and EMA statistics stay float32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("runs")
    g.add_argument("--resume", default=None, help="continue from a last.pt checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run of this name")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps")
    g.add_argument("--train-subset", type=positive_int, default=None, help="first N training images")
    g.add_argument("--test-subset", type=positive_int, default=None, help="first N test images")
    g.add_argument("--log-every", type=positive_int, default=50,
                   help="steps between host syncs (per-step scalars are still all written)")
    return p


def parse_args(argv=None):
    """-> (args, the --resume checkpoint or None); with --resume, flags not typed take the value
    the run was trained with."""
    args, checkpoint = parse_run_args(build_parser(), "vqvae", LOCKED_ON_RESUME, argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    return args, checkpoint


def setup_distributed(device):
    """torchrun sets WORLD_SIZE/RANK: join the process group (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def main(args, checkpoint=None):
    device = resolve_device(args.device)
    rank, world_size, device = setup_distributed(device)
    if args.batch_size % world_size:
        fail(f"--batch-size {args.batch_size} must be divisible by the {world_size} processes")
    shuffle = seed_everything(args.seed)
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}

    train_set = MNISTSplit(args.data_folder, True, device, args.data_pipeline, args.num_workers,
                           args.train_subset)
    test_set = MNISTSplit(args.data_folder, False, device, args.data_pipeline, args.num_workers,
                          args.test_subset)
    model = vqvae_from_config(config).to(device)
    if world_size > 1 and device.type == "cuda":  # SyncBatchNorm has no CPU kernels
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    learned_codebook = args.codebook == "loss"
    optimizer = make_optimizer(model, args.lr, device)
    amp_dtype, scaler = make_precision(device, args.amp)
    steps_per_epoch = -(-len(train_set) // args.batch_size)
    total_steps = min(args.num_epochs * steps_per_epoch, args.max_steps or float("inf"))
    scheduler = make_scheduler(optimizer, args.lr_schedule, total_steps)

    start_epoch, step, batch_in_epoch, best_loss = 0, 0, 0, float("inf")
    if checkpoint:
        load_state(model, checkpoint["state_dict"], "--resume", args.resume)
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        if scheduler:
            scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"], shuffle)
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
        batch_in_epoch, best_loss = checkpoint["batch_in_epoch"], checkpoint["best_loss"]
    raw_model = model
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    if args.compile:
        model = maybe_compile(model, device)
    # Every input is checked: only now is anything written.
    run = TrainingRun("VQ-VAE.py", args.output_folder, args.resume, args.overwrite, args.log_every,
                      rank, world_size, device)

    def checkpoint_dict(epoch, batch, shuffle_state, metrics):
        return {"kind": "vqvae", "state_dict": raw_model.state_dict(), "config": config,
                "epoch": epoch, "batch_in_epoch": batch, "step": step,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler else None,
                "rng": {**rng_state(shuffle), "shuffle": shuffle_state},
                "best_loss": best_loss, "metrics": metrics}

    writer = SummaryWriter(run.log_dir) if rank == 0 else None
    fixed_images, _ = next(test_set.batches(16))
    if writer and not args.resume:
        writer.add_image("original", image_grid(fixed_images), 0)
        raw_model.eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            writer.add_graph(raw_model, fixed_images)
            writer.add_image("reconstruction", image_grid(raw_model(fixed_images)[0]), 0)
        raw_model.train()
    if rank == 0:
        print(f"training {args.output_folder}: {len(train_set)} train / {len(test_set)} test images, "
              f"device {device}, {world_size} process(es), seed {args.seed}, "
              f"{str(amp_dtype or torch.float32).split('.')[1]}")

    for epoch in range(start_epoch, args.num_epochs):
        if step >= total_steps:
            break
        shuffle_state = shuffle.get_state()
        order = torch.randperm(len(train_set), generator=shuffle)
        model.train()
        started = time.time()
        with tqdm(train_set.batches(args.batch_size, order, batch_in_epoch, rank, world_size),
                  total=steps_per_epoch, initial=batch_in_epoch, disable=rank != 0, leave=False,
                  desc=f"epoch {epoch + 1}/{args.num_epochs}", dynamic_ncols=True) as bar:
            for images, _ in bar:
                # step: the quantizer's training-time updates (k-means init, EMA, restarts) happen
                # in its forward pass, under model.train(): see VQEmbedding.quantize
                loss, reconstruction_loss, codebook_loss, commitment_loss, indices = train_step(
                    model, optimizer, scaler, images, args.beta, learned_codebook, amp_dtype)
                if scheduler:
                    scheduler.step()
                _, perplexity, used = code_usage(indices, args.k)
                run.record(torch.stack([loss, reconstruction_loss, codebook_loss, commitment_loss,
                                        perplexity, used.float()]))
                step += 1
                batch_in_epoch += 1
                # log: one host sync every --log-every steps (under torchrun, stops agree there)
                if run.sync_due(step, batch_in_epoch == steps_per_epoch or step >= total_steps):
                    rows, signum = run.sync(step, writer, TRAIN_SCALARS)
                    bar.set_postfix(loss=f"{rows[-1][0]:.4f}")
                    if signum:
                        run.stop(signum, step, checkpoint_dict(epoch, batch_in_epoch,
                                                               shuffle_state, None))
                if step >= total_steps:
                    break
        batch_in_epoch = 0
        train_seconds = time.time() - started
        if world_size > 1:
            dist.barrier()
        if rank != 0:
            continue
        # evaluate: the whole test set in eval mode
        metrics = evaluate_vqvae(raw_model, test_set)
        counts = metrics.pop("counts")
        n = epoch + 1
        writer.add_scalar("loss/test/reconstruction", metrics["reconstruction"], step)
        writer.add_scalar("loss/test/quantization", metrics["quantization"], step)
        writer.add_scalar("loss/testing_loss", metrics["reconstruction"], n)
        writer.add_scalar("codebook/test/perplexity", metrics["perplexity"], n)
        writer.add_scalar("codebook/test/codes_used", metrics["codes_used"], n)
        writer.add_scalar("codebook/test/dead_codes", args.k - metrics["codes_used"], n)
        writer.add_histogram("codebook/test/usage", torch.repeat_interleave(
            torch.arange(args.k), counts.long()), n, bins=min(args.k, 512))
        raw_model.eval()
        with torch.no_grad():
            writer.add_image("reconstruction", image_grid(raw_model(fixed_images)[0]), n)
        raw_model.train()
        writer.flush()
        metrics["train_seconds"] = round(train_seconds, 2)
        # save: best.pt (lowest test reconstruction loss), model_<epoch>.pt, last.pt
        if metrics["reconstruction"] < best_loss:
            best_loss = metrics["reconstruction"]
            run.save("best.pt", checkpoint_dict(n, 0, shuffle.get_state(), metrics))
        final = checkpoint_dict(n, 0, shuffle.get_state(), metrics)
        run.save(f"model_{n}.pt", final)
        run.save("last.pt", final)
        print(f"epoch {n}/{args.num_epochs}  step {step}  test reconstruction "
              f"{metrics['reconstruction']:.5f}  quantization {metrics['quantization']:.5f}  "
              f"codes used {metrics['codes_used']}/{args.k}  perplexity {metrics['perplexity']:.1f}"
              f"  train {train_seconds:.1f}s")
    if writer:
        writer.close()
    if world_size > 1:  # lets a user (and the tests) see that the replicas stayed in step
        checksum = sum(p.double().sum().item() for p in raw_model.parameters())
        print(f"rank {rank} parameter checksum {checksum:.10e}")
    end_distributed(world_size)


if __name__ == "__main__":
    main(*parse_args())
