"""The command line shared by the scripts: one-line errors with exit status 2, number checks,
--device, and the VQ-VAE size flags for the original repo's checkpoints."""

import argparse
import math
import sys

import torch



def fail(message, status=2):
    """Bad input: one line on stderr, no traceback, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no multi-line usage block), exit status 2,
    and takes no abbreviations: a prefix of one flag must not silently stand for another
    (the prior's old --hidden-size would have meant --hidden-size-vae)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


def _number(cast, test, expected):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        if isinstance(value, float) and not math.isfinite(value) or not test(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")


nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")


# numpy's seed, the narrowest of the three generators seed_everything sets, takes 32 bits
seed_int = _number(int, lambda v: 0 <= v < 2 ** 32, "an integer from 0 to 2**32 - 1")


def int_between(low, high):
    return _number(int, lambda v: low <= v <= high, f"an integer from {low:,} to {high:,}")


positive_float = _number(float, lambda v: v > 0, "a finite number > 0")


nonnegative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")


unit_float = _number(float, lambda v: 0 < v <= 1, "a number > 0 and <= 1")


# --keep F draws 1/F times the maps asked for: 20 times at most, not a run that never ends
keep_fraction = _number(float, lambda v: 0.05 <= v <= 1, "a number from 0.05 to 1 (1/F times the "
                        "maps are drawn)")


fraction = _number(float, lambda v: 0 <= v < 1, "a number >= 0 and < 1")


decay_float = _number(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")


def add_data_and_device_flags(parser):
    """--data-folder and --device (VQ-VAE.py and generate.py declare their own, in the original's
    order)."""
    parser.add_argument("--data-folder", default="data", help="MNIST is in <folder>/MNIST/raw")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def renamed(new_flag):
    """The type of a flag that was renamed: any value is refused, naming the new flag."""
    def parse(text):
        raise argparse.ArgumentTypeError(f"renamed: use {new_flag} {text}")
    return parse


# `vqvae_sizes`' keys -> the flag that sets each, in errors about them
SIZE_FLAGS = {"hidden_size": "--hidden-size-vae", "k": "--k"}


def add_vqvae_size_flags(parser, *aliases):
    """--hidden-size-vae (and `aliases`) and --k: the sizes of an original-style bare state_dict, which
    has no config; for a checkpoint of this repo they are optional and must agree with it."""
    g = parser.add_argument_group("VQ-VAE sizes (only needed for the original repo's bare state_dicts)")
    g.add_argument(*aliases, "--hidden-size-vae", dest="vqvae_hidden_size", type=positive_int,
                   default=None, metavar="D", help="codeword size D (40 when the file does not say)")
    g.add_argument("--k", dest="vqvae_k", type=positive_int, default=None, metavar="K",
                   help="number of codewords K (512 when the file does not say)")


def vqvae_sizes(args):
    """The sizes given with `add_vqvae_size_flags`' flags, as `load_vqvae` takes them."""
    return {key: value for key, value in (("hidden_size", args.vqvae_hidden_size),
                                          ("k", args.vqvae_k)) if value is not None}


def resolve_device(name):
    """'cpu', 'cuda', 'cuda:N' -> torch.device. Plain 'cuda' without a GPU falls back to the CPU
    with a warning (the original's behaviour); an explicit GPU index that does not exist is an error."""
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name!r}: unknown device; expected cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        fail(f"--device {name!r}: unsupported device; expected cpu, cuda or cuda:N")
    if device.index is None and not torch.cuda.is_available():
        print("warning: --device cuda: no CUDA GPU available, falling back to cpu", file=sys.stderr)
        return torch.device("cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device
