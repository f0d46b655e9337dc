"""Write a checkpoint as a file to share or commit: its weights, configs and metrics without the
optimizer, scheduler and training state, so it reconstructs, samples and judges but cannot be
--resume'd; in float16, or with --int8 as int8 with one scale per output channel (a quarter of
float32; what that costs is the model's to measure: model.txt has the committed prior's).

    python export_checkpoint.py --model models/prior/best.pt --out prior_mnist.pt --int8
"""
import os

from checkpoints import int8_weights, load_checkpoint, save_checkpoint
from cli import ArgumentParser, fail

KEPT = ("kind", "model_config", "run_config", "config", "epoch", "step", "metrics")


def exported(checkpoint, int8):
    """A loaded checkpoint -> the dict to write: KEPT, and state_dict in float16 or int8."""
    shared = {key: checkpoint[key] for key in KEPT if key in checkpoint}
    if int8:
        shared["state_dict"], shared["int8_scales"] = int8_weights(checkpoint["state_dict"])
    else:
        shared["state_dict"] = {name: w.half() if w.is_floating_point() else w
                                for name, w in checkpoint["state_dict"].items()}
    return shared


def largest_change(before, after):
    return max(((before[name].float() - w.float()).abs().max().item()
                for name, w in after.items() if w.is_floating_point()), default=0.0)


def main():
    p = ArgumentParser(prog="export_checkpoint.py",
                       description="A checkpoint's weights, configs and metrics, to share.")
    p.add_argument("--model", required=True,
                   help="a checkpoint of VQ-VAE.py, pixelcnn_prior.py or classifier.py")
    p.add_argument("--out", required=True, help="the file to write (an existing one is kept)")
    p.add_argument("--int8", action="store_true",
                   help="weights of 2+ dims as int8 with one scale per output channel")
    args = p.parse_args()
    if os.path.exists(args.out):
        fail(f"--out {args.out}: exists; give a new name or delete it first")
    checkpoint = load_checkpoint(args.model, None)
    try:
        save_checkpoint(args.out, exported(checkpoint, args.int8))
    except OSError as e:
        fail(f"--out {args.out}: cannot write it ({e.strerror or e})")
    written = load_checkpoint(args.out, checkpoint.get("kind", "vqvae"), "--out")
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 1e6:.1f} MB, "
          f"{'int8' if args.int8 else 'float16'} weights, largest change of a weight "
          f"{largest_change(checkpoint['state_dict'], written['state_dict']):.2g}")


if __name__ == "__main__":
    main()
