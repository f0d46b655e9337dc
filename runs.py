"""The machinery of a training run, the same for all three trainers: run folders and overwrite
protection, atomic checkpoint saves, a Ctrl-C/SIGTERM stop that saves last.pt, a stop on a non-finite
loss, resume settings, random states, and stopping together under torchrun (`TrainingRun`)."""

import argparse
import copy
import glob
import math
import os
import random
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist

from checkpoints import load_resume_checkpoint, save_checkpoint
from cli import fail
from files import claim_folder, make_output_dirs


def check_run_name(name, resume, overwrite):
    """--output-folder is one plain folder name (logs/<name>, models/<name> stay inside the repo),
    and an earlier run's checkpoints there are never silently replaced: that needs --resume
    (continue it) or --overwrite (delete it first). Checks only: nothing is created."""
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        fail(f"--output-folder {name!r}: expected a run name (a plain folder name), not a path")
    model_dir = os.path.join("models", name)
    if glob.glob(os.path.join(model_dir, "*.pt")) and not resume and not overwrite:
        fail(f"{model_dir}/ already holds checkpoints of an earlier run; pass "
             f"--resume {model_dir}/last.pt to continue it or --overwrite to start over")


def prepare_run_folders(name, resume, overwrite, rank=0):
    """logs/<name> and models/<name>, created and claimed by rank 0 (`claim_folder`: one run at a
    time writes there, so two runs started at once under one name cannot both pass the check
    below and overwrite each other); `check_run_name` runs again under the claim. --overwrite then
    deletes the earlier run's checkpoints and event files. -> (log_dir, model_dir, the claim)."""
    log_dir, model_dir = os.path.join("logs", name), os.path.join("models", name)
    if rank != 0:
        return log_dir, model_dir, None
    make_output_dirs(log_dir, model_dir)
    claim = claim_folder(model_dir)
    if claim is None:
        fail(f"--output-folder {name}: another run is writing to {model_dir}/ right now; wait for "
             f"it to end or choose another name")
    check_run_name(name, resume, overwrite)
    if overwrite and not resume:
        for path in glob.glob(os.path.join(model_dir, "*.pt")) + \
                glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
            os.remove(path)
    return log_dir, model_dir, claim


def parse_run_args(parser, kind, locked, argv=None):
    """A trainer's command line -> (args, the --resume checkpoint or None): with --resume, flags not
    typed take the run's values (`apply_resume_config`); the run name is checked."""
    args = parser.parse_args(argv)
    checkpoint = None
    if args.resume:
        checkpoint = load_resume_checkpoint(args.resume, kind)
        apply_resume_config(parser, args, checkpoint["config"], locked, argv)
    check_run_name(args.output_folder, args.resume, args.overwrite)
    return args, checkpoint


def typed_flags(parser, argv=None):
    """The destinations of the flags the user typed, whatever their values: the command line parsed
    again with every default suppressed (argparse then leaves untyped flags out)."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(probe.parse_args(argv)))


def apply_resume_config(parser, args, config, locked, argv=None):
    """--resume: flags the user did not type take the resumed run's value, except where the data
    and device are (the run may resume on another machine); a typed flag always counts, and one in
    `locked` that contradicts the checkpoint is an error (one line, exit 2). A cosine schedule spans
    the steps the run was started with (past them it would climb back up), so its length is locked."""
    if config.get("lr_schedule") == "cosine":
        locked = (*locked, "num_epochs", "max_steps")
    typed = typed_flags(parser, argv)
    for key, value in config.items():
        if key in ("data_folder", "device", "num_workers"):
            continue
        mine = getattr(args, key, None)
        if key not in typed:
            setattr(args, key, value)
        elif key in locked and mine != value:
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


class TrainingRun:
    """The bookkeeping of one training run, shared by VQ-VAE.py, pixelcnn_prior.py and classifier.py.

    Created after every input check (so bad input leaves nothing on disk), it makes the run folders
    (an earlier run's checkpoints are never silently replaced) and catches Ctrl-C and SIGTERM. The
    loop hands it each step's scalars as one device tensor (`record`); at a sync point (`sync_due`)
    `sync` reads them back in one host sync, stops the run on a non-finite value (exit 1, the
    checkpoints untouched) and says whether a stop was asked for, agreed by all torchrun processes;
    `stop` then saves last.pt and exits. `save` writes a checkpoint atomically (rank 0 only).
    """

    def __init__(self, script, name, resume, overwrite, log_every, rank=0, world_size=1,
                 device="cpu"):
        self.script, self.log_every = script, log_every
        self.rank, self.world_size, self.device = rank, world_size, device
        self.log_dir, self.model_dir, self.claim = prepare_run_folders(name, resume, overwrite,
                                                                        rank)
        self.signals, self.pending = [], []
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)

    def _request_stop(self, signum, _frame):
        self.signals.append(signum)
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C kills at once

    def record(self, scalars):
        """This step's scalars (a device tensor, the loss first): kept until the next sync."""
        self.pending.append(scalars)

    def sync_due(self, step, end_of_epoch):
        """Every `log_every` steps and at the end of an epoch (steps all processes reach alike);
        alone, also as soon as a signal came."""
        return step % self.log_every == 0 or end_of_epoch or \
            self.world_size == 1 and bool(self.signals)

    def sync(self, step, writer=None, tags=()):
        """The one host sync: -> (rows of the recorded scalars, one list per step up to `step`,
        the signal number that stops all processes now, or 0). A non-finite value in any process
        ends the run here (exit 1); otherwise the rows go to `writer` under `tags`."""
        rows = torch.stack(self.pending).tolist()
        self.pending.clear()
        first_step = step - len(rows) + 1
        bad = next((i for i, row in enumerate(rows) if not all(map(math.isfinite, row))), None)
        signum, nonfinite = agree_to_stop(self.signals[0] if self.signals else 0, bad is not None,
                                          self.world_size, self.device)
        if nonfinite:
            end_distributed(self.world_size)
            where = f"became {rows[bad][0]} at step {first_step + bad}" if bad is not None else \
                f"became non-finite in another process by step {step}"
            fail(f"loss {where}; training stopped, the checkpoints already in {self.model_dir}/ "
                 f"are untouched", status=1)
        for i, row in enumerate(rows if writer else []):
            for tag, value in zip(tags, row):
                writer.add_scalar(tag, value, first_step + i)
        return rows, signum

    def save(self, filename, checkpoint):
        if self.rank != 0:
            return
        path = os.path.join(self.model_dir, filename)
        try:
            save_checkpoint(path, checkpoint)
        except OSError as e:
            fail(f"cannot write checkpoint {path}: {e.strerror or e}; the previous {filename} is "
                 f"intact", status=1)

    def stop(self, signum, step, checkpoint):
        """Save `checkpoint` as last.pt, say how to resume, leave together: exit 128 + signum."""
        who = f"rank {self.rank} " if self.world_size > 1 else ""
        print(f"\n{who}stopped by signal {signum} at step {step}", file=sys.stderr)
        self.save("last.pt", checkpoint)
        if self.rank == 0:
            print(f"resume with:\n  python {self.script} --resume {self.model_dir}/last.pt",
                  file=sys.stderr)
        end_distributed(self.world_size)
        sys.exit(128 + signum)
