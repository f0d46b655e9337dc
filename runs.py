"""The machinery of a training run, the same for all three trainers: run folders and overwrite
protection, atomic checkpoint saves, a Ctrl-C/SIGTERM stop that saves last.pt, a stop on a non-finite
loss, resume settings, random states, and stopping together under torchrun (`TrainingRun`)."""

import argparse
import copy
import glob
import math
import os
import random
import shlex
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist

from checkpoints import (load_optimizer_state, load_resume_checkpoint, load_state, run_settings,
                         save_checkpoint)
from cli import fail, nonnegative_int, positive_int
from files import claim_folder, make_output_dirs


# Where the data and the device are: a run may resume on another machine
NOT_RESUMED = ("data_folder", "device", "num_workers")


def check_run_name(name, resume, overwrite):
    """--output-folder is one plain folder name (logs/<name>, models/<name> stay inside the repo),
    and an earlier run's checkpoints there are never silently replaced: that needs --resume of
    that run's own checkpoint (continue it) or --overwrite (delete it first); a resume into
    another run's folder is no exception. Checks only: nothing is created."""
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        fail(f"--output-folder {name!r}: expected a run name (a plain folder name), not a path")
    model_dir = os.path.join("models", name)
    if overwrite and continues(resume, model_dir):
        fail(f"--overwrite with --resume {resume}: that continues the run in {model_dir}/ rather "
             f"than replacing it; drop --overwrite, or give another --output-folder")
    checkpoints = glob.glob(os.path.join(model_dir, "*.pt"))
    if checkpoints and not continues(resume, model_dir) and not overwrite:
        # last.pt, unless the run was killed before writing it (then its newest checkpoint)
        latest = os.path.join(model_dir, "last.pt")
        latest = latest if latest in checkpoints else max(checkpoints, key=os.path.getmtime)
        fail(f"{model_dir}/ already holds checkpoints of an earlier run; pass "
             f"--resume {latest} to continue it or --overwrite to start over")


def continues(resume, model_dir):
    """Whether --resume `resume` continues the run whose checkpoints are in `model_dir`."""
    # realpath: the same folder reached through a link is the same run (--overwrite deletes others)
    return bool(resume) and os.path.realpath(os.path.dirname(resume)) == os.path.realpath(model_dir)


def prepare_run_folders(name, resume, overwrite, rank=0):
    """logs/<name> and models/<name>, created and claimed by rank 0 (`claim_folder`: one run at a
    time writes there, so two runs started at once under one name cannot both pass the check
    below and overwrite each other); `check_run_name` runs again under the claim. A run that does
    not continue the folder's own (a fresh one; --overwrite, also with another run's --resume) then
    deletes its checkpoints and event files, and any run deletes a killed save's partial files.
    -> (log_dir, model_dir, the claim)."""
    log_dir, model_dir = os.path.join("logs", name), os.path.join("models", name)
    if rank != 0:
        return log_dir, model_dir, None
    make_output_dirs(log_dir, model_dir)
    claim = claim_folder(model_dir)
    if claim is None:
        fail(f"--output-folder {name}: another run is writing to {model_dir}/ right now; wait for "
             f"it to end or choose another name")
    check_run_name(name, resume, overwrite)
    # A run that does not continue this folder's own is its only run: the earlier run's files
    # (--overwrite; else there are none) and the event files of a run killed before its first
    # checkpoint would merge into its TensorBoard curves, and an earlier best.pt would outlive it.
    if not continues(resume, model_dir):
        for path in glob.glob(os.path.join(model_dir, "*.pt")) + \
                glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
            os.remove(path)
    # Under the claim no other process saves here: a partial save is a killed run's leftover
    for path in glob.glob(os.path.join(model_dir, "*.pt.tmp-*")):
        os.remove(path)
    return log_dir, model_dir, claim


def one_value_per_step(events):
    """One tag's TensorBoard scalar events, as EventAccumulator.Scalars gives them -> (steps,
    values), the last value logged at each step: an epoch that --max-steps ended mid-way is
    evaluated, and its resume logs the finished epoch's test figures at the same epoch number
    again (as does a run killed after logging an epoch, before saving it)."""
    last = {event.step: event.value for event in events}   # in the order written: later wins
    return sorted(last), [last[step] for step in sorted(last)]


def add_run_flags(parser, examples, hold_out=None):
    """The flags every trainer has (--resume, --overwrite, --train-subset, --test-subset,
    --log-every), and with `hold_out` (its default) --hold-out: `examples` names what is trained
    on ("images", "maps") and `hold_out` chooses best.pt."""
    g = parser.add_argument_group("runs")
    g.add_argument("--resume", default=None, help="continue from a last.pt of this script")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run of this name")
    g.add_argument("--train-subset", type=positive_int, default=None,
                   help=f"the first N training {examples}")
    if hold_out is not None:
        g.add_argument("--hold-out", type=nonnegative_int, default=hold_out,
                       help=f"the last N training {examples} are not trained on: they choose "
                            f"best.pt")
    g.add_argument("--test-subset", type=positive_int, default=None,
                   help=f"the first N test {examples}")
    g.add_argument("--log-every", type=positive_int, default=50,
                   help="steps between host syncs (per-step scalars are still all written)")
    return g


def parse_run_args(parser, kind, locked, argv=None, renamed=None, before_flags=None):
    """A trainer's command line -> (args, the --resume checkpoint or None): with --resume, flags not
    typed take the run's values (`apply_resume_config`). For runs written before checkpoints kept
    a "run_config", `renamed` maps a flag's old destination to its new one; `before_flags` gives
    the value a flag had in effect before it existed. The run name is checked."""
    args = parser.parse_args(argv)
    checkpoint = None
    if args.resume:
        checkpoint = load_resume_checkpoint(args.resume, kind)
        renamed = renamed if "run_config" not in checkpoint else None  # only the old "config"
        saved = run_settings(checkpoint)
        if not isinstance(saved, dict):
            fail(f"--resume {args.resume}: holds no run settings (run_config) to continue; a "
                 f"damaged file?")
        settings = {(renamed or {}).get(key, key): value for key, value in saved.items()}
        check_resumed_settings(parser, settings, args.resume)
        check_counters(checkpoint, args.resume)
        apply_resume_config(parser, args, {**(before_flags or {}), **settings}, locked, argv)
    check_run_name(args.output_folder, args.resume, args.overwrite)
    return args, checkpoint


def saved_counters(checkpoint):
    """-> (epoch, step, batch in the epoch, whether that batch's epoch was evaluated, best score):
    where a run stopped. Files from before a field existed take its default; runs written before
    the score was saved by one name kept VQ-VAE.py's in the same units (best_loss), while the
    prior's and the judges' were test-set figures, which no longer choose: they start anew."""
    return (checkpoint.get("epoch"), checkpoint.get("step"), checkpoint.get("batch_in_epoch", 0),
            checkpoint.get("evaluated", False),
            checkpoint.get("best_score", checkpoint.get("best_loss", float("inf"))))


def check_counters(checkpoint, path):
    """Where the run stopped (`saved_counters`) is what a run saves, or one line."""
    epoch, step, batch_in_epoch, evaluated, best = saved_counters(checkpoint)
    # a best score may be an int: priors trained with --hold-out 0 saved -epoch before 2026-12-06
    if not all(type(c) is int and c >= 0 for c in (epoch, step, batch_in_epoch)) or \
            type(evaluated) is not bool or type(best) not in (int, float):
        fail(f"--resume {path}: its counters (epoch {epoch!r}, step {step!r}, batch "
             f"{batch_in_epoch!r}) or best score ({best!r}) are not what a run saves; a damaged "
             f"file?")


def resume_is_complete(args, checkpoint):
    """-> whether a --resume has nothing left to train (all its epochs, or its --max-steps taken
    and evaluated); if so it says so, before any data is read or anything is written."""
    if not checkpoint:
        return False
    epoch, step, batch_in_epoch, evaluated, _ = saved_counters(checkpoint)
    max_steps = getattr(args, "max_steps", None)
    if not finished(epoch, step, batch_in_epoch, evaluated, args.num_epochs, max_steps):
        return False
    if int(os.environ.get("RANK", "0")) == 0:
        limit = "" if epoch >= args.num_epochs else f" (its --max-steps {max_steps})"
        print(f"--resume {args.resume} is complete: {epoch} of {args.num_epochs} epochs, {step} "
              f"steps{limit}; nothing to train, nothing written")
    return True


def finished(epoch, step, batch_in_epoch, evaluated, num_epochs, total_steps):
    """All epochs done, or all `total_steps` (None: no limit) taken and evaluated (a run stopped
    by a signal on its last step still owes that epoch's evaluation and save)."""
    return epoch >= num_epochs or total_steps is not None and step >= total_steps and (
        not batch_in_epoch or evaluated)


def check_resumed_settings(parser, settings, path):
    """Every setting a resume would take is one its flag accepts when typed (the same type and
    range check, the same choices), so that a damaged run_config stops here in one line rather
    than as a traceback mid-run."""
    for action in parser._actions:
        if action.dest not in settings or action.dest in ("resume", *NOT_RESUMED):
            continue
        value = settings[action.dest]
        if value is None and action.default is None:
            continue
        listed = action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 0
        values = value if listed else [value]
        if not isinstance(values, (list, tuple)) or not all(map(accepts(action), values)):
            fail(f"--resume {path}: its run settings hold {action.option_strings[0]} {value!r}, "
                 f"which that flag does not take; a damaged file?")


def accepts(action):
    """-> whether `action` (a parser flag) takes this value, as the value it would parse to."""
    def check(value):
        if action.nargs == 0:   # store_true and friends
            return isinstance(value, bool)
        if action.choices is not None and value not in action.choices:
            return False
        if action.type is None:
            return isinstance(value, str)
        try:
            return type(value) is not bool and action.type(str(value)) == value
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            return False
    return check


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
        if key in NOT_RESUMED or not hasattr(args, key):
            continue
        mine = getattr(args, key, None)
        if key not in typed:
            setattr(args, key, value)
        elif key in locked and mine != value:
            why = " (its cosine learning-rate schedule ends there)" \
                if key in ("num_epochs", "max_steps") else ""
            flag = f"--{key.replace('_', '-')}"
            was = f"with {as_typed(value)}" if value is not None else f"without {flag}"
            fail(f"{flag} {as_typed(mine)} conflicts with the checkpoint --resume {args.resume}, "
                 f"which was trained {was}{why}")


def as_typed(value):
    """A flag's value as it is typed: a list as its items, 8 8 8, not [8, 8, 8]."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value


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


def max_over_processes(values, world_size, device):
    """A list of ints -> each one's maximum over all torchrun processes. Every process calls it at
    the same point (one all-reduce), so what reached one process (a signal, a NaN, a refusal)
    stops them all there instead of leaving the rest waiting in a collective."""
    if world_size == 1:
        return values
    flags = torch.tensor(values, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()


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
    """One training run, the skeleton shared by VQ-VAE.py, pixelcnn_prior.py and classifier.py:

        with TrainingRun(...) as run:                        # resume, folders, signals, writer
            for epoch in run.epochs(num_epochs, steps_per_epoch):
                for batch in split.batches(size, run.shuffled(n), run.batch_in_epoch):
                    ... one optimisation step ...
                    run.step_done(scalars)                   # count, log, stop on a signal/NaN
                run.save_epoch(metrics, score)               # best.pt, last.pt

    `state` names what a checkpoint holds besides the bookkeeping: {"state_dict": model,
    "optimizer": ..., "scheduler": ... or None, ...}; each is saved with `state_dict()` and
    restored on --resume. It is created after every input check, so bad input leaves nothing on
    disk; it then claims the run folders (an earlier run is never silently replaced) and catches
    Ctrl-C and SIGTERM until the `with` block ends. Each step's scalars stay on the device until a
    sync point (every --log-every steps and at the end of an epoch), where one host read writes
    them to TensorBoard, stops the run on a non-finite value (exit 1, checkpoints untouched) and,
    on a signal, saves last.pt and exits 128 + signal; under torchrun all processes agree there.
    """

    def __init__(self, script, kind, args, model_config, state, checkpoint, shuffle, scalars,
                 rank=0, world_size=1, device="cpu"):
        self.script, self.kind, self.log_every = script, kind, args.log_every
        self.model_config, self.state, self.shuffle, self.scalars = model_config, state, shuffle, \
            scalars
        self.run_config = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
        self.rank, self.world_size, self.device = rank, world_size, device
        self.epoch = self.step = self.batch_in_epoch = 0
        self.evaluated = False  # whether the epoch --max-steps ended mid-way was evaluated and saved
        self.best = float("inf")  # the lowest score passed to save_epoch so far
        if checkpoint:
            self._restore(checkpoint, args.resume)
        try:
            self.log_dir, self.model_dir, self.claim = prepare_run_folders(
                args.output_folder, args.resume, args.overwrite, rank)
            refused = None
        except SystemExit as refusal:   # rank 0's one line is printed; under torchrun all stop
            refused = refusal
        if max_over_processes([int(refused is not None)], world_size, device)[0]:
            end_distributed(world_size)
            raise refused or SystemExit(2)
        self.signals, self.pending = [], []
        self.handlers = {signum: signal.signal(signum, self._request_stop)
                         for signum in (signal.SIGINT, signal.SIGTERM)}
        from torch.utils.tensorboard import SummaryWriter   # here: only a run that writes needs it
        # purge_step: what a killed run logged after its checkpoint is hidden, not drawn twice
        self.writer = SummaryWriter(self.log_dir, purge_step=self.step + 1 if checkpoint else None) \
            if rank == 0 else None

    def __enter__(self):
        return self

    def __exit__(self, *_):
        if self.writer:
            self.writer.close()
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)
        if self.claim:
            self.claim.release()

    def _restore(self, checkpoint, path):
        """Everything --resume continues: the state, the random states, the counters. A module
        missing from the checkpoint (a prior's raw weights, from runs that did not average them)
        starts from its saved weights."""
        try:
            for name, obj in self.state.items():
                saved = checkpoint.get(name)
                if isinstance(obj, torch.nn.Module):
                    load_state(obj, checkpoint["state_dict"] if saved is None else saved,
                               "--resume", path)
                elif isinstance(obj, torch.optim.Optimizer):
                    load_optimizer_state(obj, saved)
                elif obj is not None and saved:
                    obj.load_state_dict(saved)
            set_rng_state(checkpoint["rng"], self.shuffle)
        except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as e:
            fail(f"--resume {path}: its training state (optimizer, schedule or random states) "
                 f"is damaged ({type(e).__name__}: {e}); resume from another checkpoint")
        self.epoch, self.step, self.batch_in_epoch, self.evaluated, self.best = \
            saved_counters(checkpoint)   # checked by `check_counters` in parse_run_args

    def checkpoint(self, metrics=None, epoch_done=True):
        """The checkpoint of this moment: at the end of an epoch, or (epoch_done=False) mid-epoch,
        where a resume draws the epoch's order again from the shuffle state it started with and
        goes on from the next batch; a mid-epoch checkpoint with `metrics` was evaluated (the end
        of a --max-steps run), one without them (a signal) still owes the evaluation."""
        shuffle_state = self.shuffle.get_state() if epoch_done else self.epoch_shuffle_state
        return {"kind": self.kind, "model_config": self.model_config,
                "run_config": self.run_config,
                **{name: obj.state_dict() if obj is not None else None
                   for name, obj in self.state.items()},
                "epoch": self.epoch + epoch_done, "batch_in_epoch": 0 if epoch_done else
                self.batch_in_epoch, "step": self.step,
                "rng": {**rng_state(self.shuffle), "shuffle": shuffle_state},
                "evaluated": not epoch_done and metrics is not None,
                "best_score": self.best, "metrics": metrics}

    def epochs(self, num_epochs, steps_per_epoch, total_steps=None):
        """The epochs left, from where a resumed run stopped, until `num_epochs` or `total_steps`."""
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = min(num_epochs * steps_per_epoch, total_steps or float("inf"))
        for epoch in range(self.epoch, num_epochs):
            if finished(self.epoch, self.step, self.batch_in_epoch, self.evaluated, num_epochs,
                        self.total_steps):
                return
            self.epoch_shuffle_state = self.shuffle.get_state()
            yield epoch
            self.epoch, self.batch_in_epoch = epoch + 1, 0

    def shuffled(self, n):
        """This epoch's order of the n training examples (on the CPU; drawn once per epoch)."""
        return torch.randperm(n, generator=self.shuffle)

    def step_done(self, scalars):
        """After an optimisation step: count it and keep its scalars (a device tensor, the loss
        first). At a sync point -> the rows read back (one list per step since the last), else
        None. A non-finite value exits 1; a signal saves last.pt and exits 128 + signal."""
        self.pending.append(scalars)
        self.step += 1
        self.batch_in_epoch += 1
        end = self.batch_in_epoch == self.steps_per_epoch or self.step >= self.total_steps
        if not (self.step % self.log_every == 0 or end or
                self.world_size == 1 and self.signals):
            return None
        rows, signum = self._sync()
        if signum:
            self._stop(signum)
        return rows

    def out_of_steps(self):
        """Whether the run has taken all its steps (--max-steps can end it mid-epoch)."""
        return self.step >= self.total_steps

    def _sync(self):
        """The one host sync: -> (the recorded rows, the signal number that stops all processes
        now, or 0). A non-finite value in any process ends the run here (exit 1)."""
        rows = torch.stack(self.pending).tolist()
        self.pending.clear()
        first_step = self.step - len(rows) + 1
        bad = next((i for i, row in enumerate(rows) if not all(map(math.isfinite, row))), None)
        signum, nonfinite = max_over_processes([self.signals[0] if self.signals else 0,
                                                int(bad is not None)], self.world_size, self.device)
        if nonfinite:
            end_distributed(self.world_size)
            where = f"became {rows[bad][0]} at step {first_step + bad}" if bad is not None else \
                f"became non-finite in another process by step {self.step}"
            fail(f"loss {where}; training stopped, the checkpoints already in {self.model_dir}/ "
                 f"are untouched", status=1)
        for i, row in enumerate(rows if self.writer else []):
            for tag, value in zip(self.scalars, row):
                self.writer.add_scalar(tag, value, first_step + i)
        return rows, signum

    def _request_stop(self, signum, _frame):
        self.signals.append(signum)
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C kills at once

    def _stop(self, signum):
        """Save the mid-epoch checkpoint as last.pt, say how to resume, leave together."""
        who = f"rank {self.rank} " if self.world_size > 1 else ""
        print(f"\n{who}stopped by signal {signum} at step {self.step}", file=sys.stderr)
        self.save("last.pt", self.checkpoint(epoch_done=False))
        if self.rank == 0:
            # a resume takes every setting from the checkpoint except where the data and device are
            local = "".join(f" --{key.replace('_', '-')} {shlex.quote(str(self.run_config[key]))}"
                            for key in ("data_folder", "device") if self.run_config.get(key))
            # the same number of processes: another number continues, but not bit-identically
            launcher = f"torchrun --nproc_per_node={self.world_size}" if self.world_size > 1 \
                else "python3"
            print(f"resume with:\n  {launcher} {self.script} --resume {self.model_dir}/last.pt"
                  f"{local}", file=sys.stderr)
        end_distributed(self.world_size)
        sys.exit(128 + signum)

    def save_epoch(self, metrics, score, every_epoch=False):
        """At the end of an epoch, or where --max-steps ended it (rank 0): best.pt when `score`
        (lower is better) is the best so far, model_<epoch>.pt too with `every_epoch`, and last.pt.
        An epoch ended early is saved as mid-epoch, so that a resume with more steps finishes it,
        and only in best.pt and last.pt: model_<epoch>.pt holds whole epochs."""
        epoch_done = self.batch_in_epoch >= self.steps_per_epoch
        improved = score < self.best
        if improved:
            self.best = score
        checkpoint = self.checkpoint(metrics, epoch_done)   # one state, in up to three files
        if improved:
            self.save("best.pt", checkpoint)
        if every_epoch and epoch_done:
            self.save(f"model_{self.epoch + 1}.pt", checkpoint)
        self.save("last.pt", checkpoint)

    def save(self, filename, checkpoint):
        if self.rank != 0:
            return
        path = os.path.join(self.model_dir, filename)
        try:
            save_checkpoint(path, checkpoint)
        except OSError as e:
            fail(f"cannot write checkpoint {path}: {e.strerror or e}; the previous {filename} is "
                 f"intact", status=1)
