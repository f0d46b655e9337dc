"""Train the VQ-VAE on MNIST.

    python VQ-VAE.py --output-folder vqvae                 # README defaults, CPU
    python VQ-VAE.py --device cuda --compile               # GPU
    python VQ-VAE.py --quantizer fsq                       # FSQ, LFQ or SimVQ instead of the codebook
    python VQ-VAE.py --resume models/vqvae/last.pt         # continue an interrupted run
    torchrun --nproc_per_node=2 VQ-VAE.py ...              # DistributedDataParallel

Writes TensorBoard logs to logs/<output-folder>/ and checkpoints to models/<output-folder>/:
best.pt (lowest test reconstruction loss: the original repo's rule, kept; the figures README reports
are the last epoch's), model_<epoch>.pt and last.pt (everything needed to resume).
"""
import math
import multiprocessing as mp
import os
import random
import sys
import time
import warnings
from dataclasses import asdict

import torch
import torch.distributed as dist
from tqdm import tqdm

from cli import (ArgumentParser, decay_float, fail, int_between, nonnegative_float, nonnegative_int,
                 positive_float, positive_int, resolve_device, seed_int)
from data import TRAIN_IMAGES, MNISTSplit
from image_grids import image_grid
from modules import ORIGINAL_CONFIG, VQVAEConfig, vqvae_from_config
from runs import (TrainingRun, add_run_flags, end_distributed, parse_run_args,
                  resume_is_complete, seed_everything, typed_flags)
from training import (LR_SCHEDULES, add_compile_flags, check_compile_flags, evaluate_vqvae,
                      loss_weights, make_optimizer, make_precision, make_scheduler, maybe_compile,
                      step_scalar_tags, step_scalars, train_step)
from vector_quantizer import (CODEBOOK_INITS, CODEBOOKS, GRADIENTS, MAX_IMPLICIT_K, QUANTIZERS,
                              fsq_levels_problem, lfq_k_problem)

# A --resume must agree with the checkpoint on these; others (device, epochs at a constant learning
# rate, ...) may be changed.
LOCKED_ON_RESUME = ("hidden_size", "k", "quantizer", "fsq_levels", "lfq_entropy_weight",
                    "codebook", "codebook_init", "ema_decay", "dead_code_threshold", "gradient",
                    "conv_init_scale", "latent_init_scale", "batch_size", "lr", "lr_schedule",
                    "beta", "seed", "train_subset", "amp")
DEFAULTS = VQVAEConfig()
# Runs from before a flag existed trained as the original did there: resumed, they go on so.
BEFORE_FLAGS = {**asdict(ORIGINAL_CONFIG), "fsq_levels": list(ORIGINAL_CONFIG.fsq_levels),
                "lr_schedule": "constant"}
# The quantizers each quantizer-specific flag applies to; typed with another it is refused.
QUANTIZER_FLAGS = {"codebook": ("vq",), "codebook_init": ("vq",), "ema_decay": ("vq",),
                   "dead_code_threshold": ("vq",), "gradient": ("vq",), "fsq_levels": ("fsq",),
                   "lfq_entropy_weight": ("lfq",), "beta": ("vq", "lfq", "simvq")}


def build_parser():
    p = ArgumentParser(prog="VQ-VAE.py", description="Train a VQ-VAE on MNIST.")
    p.add_argument("--output-folder", default="vqvae", help="run name: logs/<name>, models/<name>")
    p.add_argument("--data-folder", default="data", help="MNIST goes to <folder>/MNIST/raw")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    # Bounded where memory would run out mid-run with a traceback: D of a few thousand channels
    # at 7x7 or K beyond FSQ's and LFQ's limit is no MNIST model
    p.add_argument("--hidden-size", type=int_between(1, 4096), default=DEFAULTS.hidden_size,
                   help="latent/codeword size D")
    p.add_argument("--k", type=int_between(1, MAX_IMPLICIT_K), default=DEFAULTS.k,
                   help="number of codewords K")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--num-epochs", "--num_epoch", dest="num_epochs", type=positive_int, default=10)
    p.add_argument("--lr", type=positive_float, default=2e-4, help="Adam learning rate")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine")
    p.add_argument("--beta", type=positive_float, default=1.0,
                   help="commitment loss weight (vq, lfq, simvq: FSQ has none)")
    p.add_argument("--num-workers", type=nonnegative_int, default=max(mp.cpu_count() - 1, 0),
                   help="DataLoader workers of --data-pipeline torchvision (the device pipeline "
                        "needs none)")
    p.add_argument("--seed", type=seed_int, default=None, help="default: drawn and recorded")
    g = p.add_argument_group("quantizer")
    g.add_argument("--quantizer", choices=QUANTIZERS, default=DEFAULTS.quantizer,
                   help="vq: the codebook (options below); fsq, lfq, simvq: see vector_quantizer.py")
    g.add_argument("--fsq-levels", type=positive_int, nargs="+", default=list(DEFAULTS.fsq_levels),
                   help="fsq: levels per channel; K is their product")
    g.add_argument("--lfq-entropy-weight", type=nonnegative_float, default=0.1,
                   help="lfq: weight of the entropy loss (K must be a power of two)")
    g = p.add_argument_group("codebook (--quantizer vq)")
    g.add_argument("--codebook", choices=CODEBOOKS, default=DEFAULTS.codebook)
    g.add_argument("--codebook-init", choices=CODEBOOK_INITS,
                   default=DEFAULTS.codebook_init)
    g.add_argument("--ema-decay", type=decay_float, default=DEFAULTS.ema_decay)
    g.add_argument("--dead-code-threshold", type=nonnegative_float,
                   default=DEFAULTS.dead_code_threshold,
                   help="re-seed codes used fewer times per batch (EMA) than this; 0 disables")
    g.add_argument("--gradient", choices=GRADIENTS, default=DEFAULTS.gradient,
                   help="how the decoder's gradient crosses the quantizer (the original's: straight-through)")
    g = p.add_argument_group("initialisation (1 and 1: the original's Xavier init)")
    g.add_argument("--conv-init-scale", type=positive_float,
                   default=DEFAULTS.conv_init_scale,
                   help="convolutions followed by BatchNorm start at this times their Xavier init")
    g.add_argument("--latent-init-scale", type=positive_float,
                   default=DEFAULTS.latent_init_scale,
                   help="the encoder output z_e(x) starts at this times its Xavier-init scale")
    g = p.add_argument_group("speed")
    g.add_argument("--data-pipeline", choices=("device", "torchvision"), default="device",
                   help="device: whole split as uint8 on the device; torchvision: the original's loader")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision fitting the hardware: bf16 on GPUs of compute capability "
                        "8.0+ (A100, H100, H200, RTX 30xx+) and on CPUs with AVX512-BF16/AMX; fp16 "
                        "with loss scaling on older GPUs (T4, V100); float32 with a warning on "
                        "other CPUs. The quantizer's distances and EMA statistics stay float32")
    add_compile_flags(g, "torch.compile's mode, with --compile: reduce-overhead replays each "
                         "step as CUDA graphs on a GPU, 2.3x faster per step than eager on an "
                         "H200; not under torchrun")
    add_run_flags(p, "images").add_argument("--max-steps", type=positive_int, default=None,
                                            help="stop after this many steps")
    return p


def parse_args(argv=None):
    """-> (args, the --resume checkpoint or None); with --resume, flags not typed take the value
    the run was trained with."""
    parser = build_parser()
    args, checkpoint = parse_run_args(parser, "vqvae", LOCKED_ON_RESUME, argv,
                                      before_flags=BEFORE_FLAGS)
    typed = typed_flags(parser, argv)
    check_quantizer_flags(args, typed)
    check_compile_flags(args, typed)
    if args.compile_mode != "default" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # CUDA graphs with DistributedDataParallel and SyncBatchNorm: known torch problems, untried
        fail(f"--compile-mode {args.compile_mode} is not supported under torchrun; use "
             f"--compile-mode default there")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    if args.num_workers and args.data_pipeline == "device" and \
            "num_workers" in typed and os.environ.get("RANK", "0") == "0":
        print("note: --num-workers is for --data-pipeline torchvision; the device pipeline keeps "
              "the data on the device and needs no workers", file=sys.stderr)
    return args, checkpoint


def check_quantizer_flags(args, typed):
    """One line, exit 2, for a flag of another quantizer or a K this quantizer cannot have; FSQ's K
    is the product of its levels (a typed --k must agree)."""
    for key, owners in QUANTIZER_FLAGS.items():
        if key in typed and args.quantizer not in owners:
            fail(f"--{key.replace('_', '-')} applies to --quantizer {' or '.join(owners)}, not "
                 f"--quantizer {args.quantizer}")
    if args.quantizer == "fsq":
        levels, product = " ".join(map(str, args.fsq_levels)), math.prod(args.fsq_levels)
        if problem := fsq_levels_problem(args.fsq_levels):
            fail(f"--fsq-levels {levels}: {problem}")
        if "k" in typed and args.k != product:
            default = "" if "fsq_levels" in typed else " (the default)"
            fail(f"--k {args.k} contradicts --fsq-levels {levels}{default}, whose product "
                 f"K = {product} is FSQ's number of codes")
        args.k = product
    if args.quantizer == "lfq" and (problem := lfq_k_problem(args.k)):
        fail(f"--k {args.k} with --quantizer lfq: {problem}")


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


def model_config(args):
    return VQVAEConfig(**{name: getattr(args, name) for name in asdict(DEFAULTS)
                          if name != "fsq_levels"}, fsq_levels=tuple(args.fsq_levels))


def log_images(writer, model, images, step):
    """Reconstructions of the fixed test images, in eval mode (the original logged training mode)."""
    model.eval()
    with torch.no_grad():
        writer.add_image("reconstruction", image_grid(model(images)[0]), step)
    model.train()


def log_evaluation(writer, metrics, counts, K, step, epoch):
    writer.add_scalar("loss/test/reconstruction", metrics["reconstruction"], step)
    writer.add_scalar("loss/test/quantization", metrics["quantization"], step)
    writer.add_scalar("loss/testing_loss", metrics["reconstruction"], epoch)
    writer.add_scalar("codebook/test/perplexity", metrics["perplexity"], epoch)
    writer.add_scalar("codebook/test/codes_used", metrics["codes_used"], epoch)
    writer.add_scalar("codebook/test/dead_codes", K - metrics["codes_used"], epoch)
    writer.add_histogram("codebook/test/usage", torch.repeat_interleave(
        torch.arange(K), counts.long()), epoch, bins=min(K, 512))


def main(args, checkpoint=None):
    if resume_is_complete(args, checkpoint):   # nothing read, nothing written
        return
    device = resolve_device(args.device)
    rank, world_size, device = setup_distributed(device)
    if args.batch_size % world_size:
        fail(f"--batch-size {args.batch_size} must be divisible by the {world_size} processes")
    last_batch = min(args.train_subset or TRAIN_IMAGES, TRAIN_IMAGES) % args.batch_size
    if 0 < last_batch < world_size:   # a process would train on no image: a NaN loss
        fail(f"--train-subset {args.train_subset} with --batch-size {args.batch_size}: the last "
             f"batch of {last_batch} image(s) cannot be shared by the {world_size} processes")
    shuffle = seed_everything(args.seed)
    train_set = MNISTSplit(args.data_folder, True, device, args.data_pipeline, args.num_workers,
                           args.train_subset)
    test_set = MNISTSplit(args.data_folder, False, device, args.data_pipeline, args.num_workers,
                          args.test_subset)
    config = model_config(args)
    raw_model = vqvae_from_config(config).to(device)
    if world_size > 1 and device.type == "cuda":  # SyncBatchNorm has no CPU kernels
        raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    optimizer = make_optimizer(raw_model, args.lr, device)
    amp_dtype, scaler = make_precision(device, args.amp)
    steps_per_epoch = -(-len(train_set) // args.batch_size)
    total_steps = min(args.num_epochs * steps_per_epoch, args.max_steps or float("inf"))
    scheduler = make_scheduler(optimizer, args.lr_schedule, total_steps)
    state = {"state_dict": raw_model, "optimizer": optimizer, "scaler": scaler,
             "scheduler": scheduler}
    weights, quantizer = loss_weights(args.beta, args.lfq_entropy_weight), raw_model.codeBook
    # Every input is checked: only now is anything written.
    with TrainingRun("VQ-VAE.py", "vqvae", args, asdict(config), state, checkpoint, shuffle,
                     step_scalar_tags(quantizer.loss_names), rank, world_size, device) as run:
        model = torch.nn.parallel.DistributedDataParallel(raw_model) if world_size > 1 else raw_model
        model = maybe_compile(model, device, args.compile_mode) if args.compile else model
        writer, fixed_images = run.writer, next(test_set.batches(16))[0]
        if writer and not args.resume:
            writer.add_image("original", image_grid(fixed_images), 0)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                # the graph of one image is the same; tracing 16 costs about 0.5 s per run
                writer.add_graph(raw_model.eval(), fixed_images[:1])
            log_images(writer, raw_model, fixed_images, 0)
        if rank == 0:
            print(f"training {args.output_folder}: {len(train_set)} train / {len(test_set)} test "
                  f"images, device {device}, {world_size} process(es), seed {args.seed}, "
                  f"{str(amp_dtype or torch.float32).split('.')[1]}")
        for epoch in run.epochs(args.num_epochs, steps_per_epoch, args.max_steps):
            # batch
            batches = train_set.batches(args.batch_size, run.shuffled(len(train_set)),
                                        run.batch_in_epoch, rank, world_size)
            model.train()
            started = time.time()
            with tqdm(batches, total=steps_per_epoch, initial=run.batch_in_epoch,
                      disable=rank != 0, leave=False, dynamic_ncols=True,
                      desc=f"epoch {epoch + 1}/{args.num_epochs}") as bar:
                for images, _ in bar:
                    if run.out_of_steps():  # --max-steps, or resumed from a stop on its last step
                        break
                    # step: the quantizer's training-time updates (k-means init, EMA, restarts)
                    # happen in its forward pass, under model.train(): VQEmbedding.quantize
                    losses = train_step(model, optimizer, scaler, images, weights, amp_dtype)
                    if scheduler:
                        scheduler.step()
                    # log: one host sync every --log-every steps (torchrun processes agree there)
                    rows = run.step_done(step_scalars(losses, args.k, quantizer.loss_names))
                    if rows:
                        bar.set_postfix(loss=f"{rows[-1][0]:.4f}")
            train_seconds = time.time() - started
            if world_size > 1:
                dist.barrier()
            if rank != 0:
                continue
            # evaluate: the whole test set in eval mode
            metrics = evaluate_vqvae(raw_model, test_set)
            log_evaluation(writer, metrics, metrics.pop("counts"), args.k, run.step, epoch + 1)
            log_images(writer, raw_model, fixed_images, epoch + 1)
            writer.flush()
            metrics["train_seconds"] = round(train_seconds, 2)
            # save: best.pt (lowest test reconstruction loss), model_<epoch>.pt, last.pt
            run.save_epoch(metrics, metrics["reconstruction"], every_epoch=True)
            print(f"epoch {epoch + 1}/{args.num_epochs}  step {run.step}  test reconstruction "
                  f"{metrics['reconstruction']:.5f}  quantization {metrics['quantization']:.5f}  "
                  f"codes used {metrics['codes_used']}/{args.k}  perplexity "
                  f"{metrics['perplexity']:.1f}  train {train_seconds:.1f}s")
    if world_size > 1:  # lets a user (and the tests) see that the replicas stayed in step
        checksum = sum(p.double().sum().item() for p in raw_model.parameters())
        print(f"rank {rank} parameter checksum {checksum:.10e}")
    end_distributed(world_size)


if __name__ == "__main__":
    main(*parse_args())
