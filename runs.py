"""The machinery of a training run: run folders and overwrite protection, resume settings, random
states, and stopping together under torchrun."""

import glob
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from cli import fail


def prepare_run_folders(name, resume, overwrite, rank=0):
    """logs/<name> and models/<name>, created by rank 0. An earlier run's checkpoints are never
    silently replaced: that needs --resume (continue it) or --overwrite (delete it first)."""
    log_dir, model_dir = os.path.join("logs", name), os.path.join("models", name)
    if rank != 0:
        return log_dir, model_dir
    earlier = glob.glob(os.path.join(model_dir, "*.pt"))
    if earlier and not resume and not overwrite:
        fail(f"{model_dir}/ already holds checkpoints of an earlier run; pass "
             f"--resume {model_dir}/last.pt to continue it or --overwrite to start over")
    make_output_dirs(log_dir, model_dir)
    if overwrite and not resume:
        for path in earlier + glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
            os.remove(path)
    return log_dir, model_dir


def apply_resume_config(parser, args, config, locked):
    """--resume: flags left at their default take the resumed run's value, except where the data
    and device are (the run may resume on another machine); a flag in `locked` that was given and
    contradicts the checkpoint is an error (one line, exit 2). A cosine schedule spans the steps the
    run was started with (past them it would climb back up), so its length is locked too."""
    if config.get("lr_schedule") == "cosine":
        locked = (*locked, "num_epochs", "max_steps")
    for key, value in config.items():
        if key in ("data_folder", "device", "num_workers"):
            continue
        mine = getattr(args, key, None)
        if mine == parser.get_default(key) or key in locked and mine == value:
            setattr(args, key, value)
        elif key in locked:
            why = " (its cosine learning-rate schedule ends there)" \
                if key in ("num_epochs", "max_steps") else ""
            fail(f"--{key.replace('_', '-')} {mine} conflicts with the checkpoint "
                 f"--resume {args.resume}, which was trained with {value}{why}")


def rng_state(shuffle):
    """Every random state a run draws from (torch, CUDA, numpy, python, the shuffling generator),
    as tensors and plain values so that weights_only loading reads it back."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(state, shuffle):
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    restore_cuda_rng(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))


def restore_cuda_rng(states):
    """The saved RNG state of each GPU that exists here; GPUs the checkpoint knew and this machine
    lacks are skipped, GPUs it did not know keep their seeded state, with a warning either way."""
    present = torch.cuda.device_count()
    if states and len(states) != present:
        print(f"warning: the checkpoint holds the random state of {len(states)} GPU(s), this "
              f"machine has {present}; restoring {min(len(states), present)}", file=sys.stderr)
    for index, cuda_state in enumerate(states[:present]):
        torch.cuda.set_rng_state(cuda_state, index)


def agree_to_stop(signum, nonfinite, world_size, device):
    """-> (signal number, whether a loss was non-finite), each the maximum over all processes. Every
    process calls it at the same step (one all-reduce), so a signal that reached one process, or a
    NaN in one, stops them all at that step instead of leaving the rest waiting in a collective."""
    if world_size == 1:
        return signum, nonfinite
    flags = torch.tensor([signum, int(nonfinite)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    signum, nonfinite = flags.tolist()
    return signum, bool(nonfinite)


def end_distributed(world_size):
    """Under torchrun: wait for every process (rank 0 may be writing a checkpoint), then leave the
    process group, so that all exit together and cleanly."""
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed):
    """Seed torch, numpy and python; returns the generator that shuffles the training data."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return torch.Generator().manual_seed(seed)


def make_output_dirs(*paths):
    """Create output folders, or stop with one line naming the one that cannot be written."""
    for path in paths:
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f".write-test-{os.getpid()}")
            open(probe, "wb").close()
            os.remove(probe)
        except OSError as e:
            fail(f"cannot write output folder {path}: {e.strerror or e}")
