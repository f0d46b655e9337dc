"""Draw README's figures from the TensorBoard event files of two VQ-VAE.py runs.

    python3 readme_figures.py --original-run logs/seedcfg_s1 --default-run logs/default_s1

readme_images/test_curves.png: test MSE and test perplexity per epoch of both runs (two panels).
readme_images/code_usage.png: how often each code is used on the test set after the last epoch,
codes sorted from most to least used (the `codebook/test/usage` histogram): the original's collapse
onto a few codes against the default's flat usage.
"""
import os

import matplotlib
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import ArgumentParser, fail
from files import atomic_write, make_output_dirs
from runs import one_value_per_step

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

RUNS = (("original configuration", "original_run", "tab:red"), ("README defaults", "default_run", "tab:blue"))


def read_run(log_dir):
    """-> (epochs, test MSE, test perplexity, per-code test usage after the last epoch, sorted)."""
    if not os.path.isdir(log_dir):
        fail(f"{log_dir}: not a folder; expected the logs/<name> folder of a VQ-VAE.py run")
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    missing = [tag for kind, tag in (("scalars", "loss/testing_loss"),
                                     ("scalars", "codebook/test/perplexity"),
                                     ("histograms", "codebook/test/usage"))
               if tag not in tags[kind]]
    if missing:
        fail(f"{log_dir}: no {', '.join(missing)} events; expected the logs/ folder of a "
             f"VQ-VAE.py run that finished an epoch")
    epochs, mse = one_value_per_step(events.Scalars("loss/testing_loss"))
    _, perplexity = one_value_per_step(events.Scalars("codebook/test/perplexity"))
    usage = np.sort(np.array(events.Histograms("codebook/test/usage")[-1].histogram_value.bucket))
    return epochs, mse, perplexity, usage[::-1]


def save(fig, path):
    with atomic_write(path) as f:   # a failed call leaves the committed figure whole
        fig.savefig(f, format="png", dpi=100)


def main():
    p = ArgumentParser(prog="readme_figures.py", description="README figures from event files.")
    p.add_argument("--original-run", required=True, help="logs/<name> of a run of the original configuration")
    p.add_argument("--default-run", required=True, help="logs/<name> of a README-defaults run")
    p.add_argument("--output-folder", default="readme_images")
    args = p.parse_args()
    runs = {name: (read_run(getattr(args, key)), colour) for name, key, colour in RUNS}
    make_output_dirs(args.output_folder)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, ((epochs, mse, perplexity, _), colour) in runs.items():
        left.plot(epochs, mse, "o-", color=colour, label=name)
        right.plot(epochs, perplexity, "o-", color=colour, label=name)
    left.set(yscale="log", xlabel="epoch", ylabel="test MSE on [-1, 1] (log scale)",
             title="reconstruction error")
    right.set(xlabel="epoch", ylabel="test perplexity (codes in use)", title="codebook use",
              ylim=(0, None))
    left.legend()
    fig.tight_layout()
    save(fig, os.path.join(args.output_folder, "test_curves.png"))

    fig, ax = plt.subplots(figsize=(10, 3.2))
    for name, ((*_, usage), colour) in runs.items():
        ax.bar(np.arange(len(usage)), usage / usage.sum(), width=1.0, color=colour, alpha=0.6,
               label=f"{name}: {int((usage > 0).sum())} codes used")
    ax.set(yscale="log", xlabel="codes, sorted from most to least used",
           ylabel="share of test-set code positions", title="code usage after the last epoch")
    ax.legend()
    fig.tight_layout()
    save(fig, os.path.join(args.output_folder, "code_usage.png"))
    print(f"wrote {args.output_folder}/test_curves.png and {args.output_folder}/code_usage.png")


if __name__ == "__main__":
    main()
