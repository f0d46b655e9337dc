"""Write a checkpoint as a file to share or commit: its weights, configs and metrics without the
optimizer, scheduler and training state, so it reconstructs, samples and judges but cannot be
--resume'd; in float16, or with --int8 as int8 with one scale per slice of each weight's first dim
(a convolution's output channel; a quarter of float32). The metrics stay those of the weights
exported: what the rounding costs is the model's to measure (model.txt has the committed prior's).

    python export_checkpoint.py --model models/prior/best.pt --out prior_mnist.pt --int8
"""
import os

import torch

from checkpoints import (half_weights, int8_weights, load_checkpoint, load_classifier, load_prior,
                         load_vqvae, save_checkpoint)
from cli import ArgumentParser, fail
from files import check_file_to_write, make_output_dirs

KEPT = ("kind", "model_config", "run_config", "config", "epoch", "step", "metrics")
FLOAT16_MAX = torch.finfo(torch.float16).max
LOADERS = {"vqvae": load_vqvae, "prior": load_prior, "classifier": load_classifier}


def exported(checkpoint, int8):
    """A loaded checkpoint -> the dict to write: KEPT, and state_dict in float16 or int8."""
    shared = {key: checkpoint[key] for key in KEPT if key in checkpoint}
    if int8:
        shared["state_dict"], shared["int8_scales"] = int8_weights(checkpoint["state_dict"])
    else:
        shared["state_dict"] = half_weights(checkpoint["state_dict"])
    return shared


def check_weights(state_dict, path):
    """One line naming the first entry that is not a tensor, or beyond float16's range (the
    loader has already refused NaN and infinity)."""
    if not isinstance(state_dict, dict):
        fail(f"--model {path}: its state_dict is not a dict of tensors")
    for name, w in state_dict.items():
        if not isinstance(w, torch.Tensor):
            fail(f"--model {path}: {name} is not a tensor")
        if w.is_floating_point() and not (w.float().abs() <= FLOAT16_MAX).all():
            fail(f"--model {path}: {name} is beyond float16's range (|w| <= {FLOAT16_MAX:g})")


def largest_change(before, after):
    return max(((before[name].float() - w.float()).abs().max().item()
                for name, w in after.items() if w.is_floating_point()), default=0.0)


def main():
    p = ArgumentParser(prog="export_checkpoint.py",
                       description="A checkpoint's weights, configs and metrics, to share.")
    p.add_argument("--model", required=True,
                   help="a checkpoint of VQ-VAE.py, pixelcnn_prior.py or classifier.py, or the "
                        "original repo's")
    p.add_argument("--out", required=True, help="the file to write (an existing one is kept)")
    p.add_argument("--int8", action="store_true",
                   help="weights of 2+ dims as int8, one scale per slice of the first dim")
    args = p.parse_args()
    check_file_to_write(args.out, "--out", may_exist=False)
    checkpoint = load_checkpoint(args.model, None)
    check_weights(checkpoint["state_dict"], args.model)
    # the model it describes is built and takes its weights: a foreign file is refused here, not
    # by whoever is given the export
    LOADERS[checkpoint.get("kind", "vqvae")](args.model, "cpu", flag="--model")
    make_output_dirs(os.path.dirname(args.out) or ".")
    try:   # checked above, and claimed here: another export that got there first is kept
        save_checkpoint(args.out, exported(checkpoint, args.int8), replace=False)
    except FileExistsError:
        fail(f"--out {args.out}: exists (written a moment ago by another process); give a new "
             f"name or delete it first")
    except OSError as e:
        fail(f"--out {args.out}: cannot write it ({e.strerror or e})")
    written = load_checkpoint(args.out, checkpoint.get("kind", "vqvae"), "--out")
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 1e6:.1f} MB, "
          f"{'int8' if args.int8 else 'float16'} weights, largest change of a weight "
          f"{largest_change(checkpoint['state_dict'], written['state_dict']):.2g}")


if __name__ == "__main__":
    main()
