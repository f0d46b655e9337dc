"""The quantizer comparison: VQ-VAE.py with each quantizer, several seeds, one table and one figure.

    python3 compare_quantizers.py                       # train what is missing, then report
    python3 compare_quantizers.py --report-only         # the table and figure of finished runs
    python3 compare_quantizers.py --variants fsq lfq --seeds 0 --num-epochs 2   # a shorter look
    python3 compare_quantizers.py --prior-epochs 3      # and a prior per quantizer, judged

Each (variant, seed) is one `VQ-VAE.py --output-folder q_<variant>_s<seed> --seed <seed>` run at
the README defaults otherwise, in this folder's logs/ and models/; an interrupted one is resumed
(`--resume`, bit-identical), a finished one is left as it is, one another process is training is
skipped (two comparisons can share the work: `--seeds 0 2` in one shell, `--seeds 1` in another).
Variants:

    vq           the README defaults (EMA codebook, k-means init, dead-code restarts)
    vq-original  the original repo's configuration (codebook loss, uniform init, constant rate)
    fsq lfq simvq  `--quantizer fsq|lfq|simvq` at their defaults (vector_quantizer.py)

The report: test MSE, codes used, perplexity, bits per code map at the code entropy (49 log2
perplexity) and training seconds per epoch, mean +- std over the seeds, after the last epoch
(markdown, and one JSON line); quantizers.png (--figure; README's is readme_images/quantizers.png)
draws codes used and perplexity per epoch (mean over the seeds) for every variant.

With --prior-epochs N, one prior per variant over the first seed's codes, by the same command
(`pixelcnn_prior.py --vqvae-model models/q_<variant>_s<seed>/last.pt --output-folder
prior_<variant>_s<seed> --num-epochs N --seed <seed>`, resumed if interrupted), judged by
`sample_quality.py --json --no-baselines` at generate.py's default sampler (written to
models/prior_<variant>_s<seed>/sample_quality.json); the second table: the prior's test NLL, and per judge
the class agreement and the Frechet distance as a multiple of its floor (that VQ-VAE's
reconstructions of random draws of its training images), the CNN judge's recall, the two-sample accuracy.
--prior-flags and --judge-flags pass more flags to those two scripts (e.g. a quick look on fewer
maps and samples).
"""
import json
import math
import os
import shlex
import signal
import subprocess
import sys

import matplotlib
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from checkpoints import load_checkpoint
from cli import (ArgumentParser, add_data_and_device_flags, fail, nonnegative_int, positive_int,
                 seed_int)
from files import atomic_write, check_file_to_write, claim_folder
from modules import ORIGINAL_CONFIG
from runs import one_value_per_step

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))
# The original repo's configuration: its model (`ORIGINAL_CONFIG`) and its constant learning rate.
ORIGINAL = [*(item for name in ("codebook", "codebook_init", "dead_code_threshold",
                                "conv_init_scale", "latent_init_scale")
              for item in (f"--{name.replace('_', '-')}", str(getattr(ORIGINAL_CONFIG, name)))),
            "--lr-schedule", "constant"]
VARIANTS = {"vq": [], "vq-original": ORIGINAL, "fsq": ["--quantizer", "fsq"],
            "lfq": ["--quantizer", "lfq"], "simvq": ["--quantizer", "simvq"]}
COLOURS = {"vq": "tab:blue", "vq-original": "tab:red", "fsq": "tab:green", "lfq": "tab:purple",
           "simvq": "tab:orange"}


def run_name(variant, seed):
    return f"q_{variant}_s{seed}"


def state(name, num_epochs, kind="vqvae", flag="--num-epochs", vqvae_model=None):
    """'missing', 'unfinished' or 'done', from models/<name>/last.pt; a run started for another
    number of epochs is an error (its cosine schedule spans those), and so is a prior over another
    VQ-VAE than `vqvae_model`."""
    path = os.path.join("models", name, "last.pt")
    if not os.path.isfile(path):
        return "missing"
    checkpoint = load_checkpoint(path, kind, flag)
    planned = checkpoint.get("run_config", {}).get("num_epochs")
    if planned != num_epochs:
        fail(f"{flag} {num_epochs}: {path} belongs to a run of {planned} epochs; pass "
             f"{flag} {planned}, or compare in another folder")
    trained_on = checkpoint.get("run_config", {}).get("vqvae_model") or "an unnamed VQ-VAE"
    if vqvae_model and os.path.normpath(trained_on) != os.path.normpath(vqvae_model):
        fail(f"models/{name}/ is a prior over {trained_on}, not {vqvae_model}; move it away")
    if checkpoint.get("epoch", 0) < num_epochs or checkpoint.get("batch_in_epoch"):
        return "unfinished"
    return "done"


def run_script(script, flags, name, capture=False):
    """Run one of this repo's scripts -> its stdout when `capture`; its failure stops us. Ctrl-C or
    SIGTERM to this process reaches the script as SIGTERM (a trainer saves last.pt and exits), and
    the comparison stops with it rather than leaving it running alone."""
    command = [sys.executable, os.path.join(REPO, script), *flags]
    print(" ".join(command[1:]), flush=True)
    stops, processes = [], []

    def forward(signum, _frame):   # SIGTERM even for a Ctrl-C: the script may have had that one
        stops.append(signum)
        for process in processes:
            process.send_signal(signal.SIGTERM)
    # caught before the script starts: a stop in between must not leave it running alone
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE if capture else None)
        processes.append(process)
        if stops:   # it came while the script was starting
            process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stops:
        fail(f"{name}: stopped by signal {stops[0]}; rerun the same command to go on from there",
             status=128 + stops[0])
    if process.returncode:
        fail(f"{name}: {script} failed (its error is above); rerun to go on from there")
    return stdout


def being_trained(name):
    """Whether another process (a second comparison, a shell) is training models/<name> now.
    (Checked, not held: the trainer takes the folder itself, so a second comparison that gets
    here in the same instant stops on that trainer's one-line refusal.)"""
    folder = os.path.join("models", name)
    claim = claim_folder(folder) if os.path.isdir(folder) else None
    if os.path.isdir(folder) and claim is None:
        print(f"{name}: being trained by another process, skipped", flush=True)
        return True
    if claim is not None:
        claim.release()
    return False


def train(variant, seed, args):
    name = run_name(variant, seed)
    where = ["--data-folder", args.data_folder, "--device", args.device]
    status = state(name, args.num_epochs)
    if status == "done" or being_trained(name):
        return
    if status == "unfinished":
        flags = ["--resume", os.path.join("models", name, "last.pt"), *where]
    else:
        flags = ["--output-folder", name, "--seed", str(seed), "--num-epochs",
                 str(args.num_epochs), *VARIANTS[variant], *where]
    run_script("VQ-VAE.py", flags, name)


def prior_name(variant, seed):
    return f"prior_{variant}_s{seed}"


def train_and_judge_prior(variant, seed, args):
    """The prior over one variant's codes, then its sample_quality.json (each skipped when done;
    delete the folder to redo them, e.g. with other --prior-flags or --judge-flags)."""
    name, vqvae = prior_name(variant, seed), os.path.join("models", run_name(variant, seed), "last.pt")
    where = ["--data-folder", args.data_folder, "--device", args.device]
    if state(run_name(variant, seed), args.num_epochs) != "done":
        print(f"{name}: {vqvae} has not finished, skipped", flush=True)
        return
    status = state(name, args.prior_epochs, "prior", "--prior-epochs", vqvae_model=vqvae)
    if status != "done" and being_trained(name):
        return
    if status == "missing":
        run_script("pixelcnn_prior.py", ["--vqvae-model", vqvae, "--output-folder", name,
                                         "--num-epochs", str(args.prior_epochs), "--seed", str(seed),
                                         *args.prior_flags, *where], name)
    elif status == "unfinished":
        run_script("pixelcnn_prior.py", ["--resume", os.path.join("models", name, "last.pt"),
                                         *where], name)
    report = os.path.join("models", name, "sample_quality.json")
    claim = None if os.path.isfile(report) else claim_folder(os.path.join("models", name))
    if claim is None:  # judged already, or being judged by another comparison
        return
    stdout = run_script("sample_quality.py", [
        "--model", vqvae, "--prior-model", os.path.join("models", name, "best.pt"), "--json",
        "--no-baselines", *args.judge_flags, *where], name, capture=True)
    with atomic_write(report) as f:
        f.write(stdout)
    claim.release()


def prior_rows(variant, seed):
    """-> ({row label: cells} of the prior table, one row per sampler judged, the judges), or None
    before the prior is judged."""
    folder = os.path.join("models", prior_name(variant, seed))
    path = os.path.join(folder, "sample_quality.json")
    if not os.path.isfile(path):
        return None
    nll = load_checkpoint(os.path.join(folder, "best.pt"), "prior",
                          "--prior-epochs")["metrics"]["test_bits_per_map"]
    try:
        with open(path) as f:
            report = json.load(f)
        rows = {row["source"]: row for row in report["rows"]}
        floor = rows[report["floor"]]["judges"], rows[report["floor"]]["two_sample_accuracy"]
    except (OSError, ValueError, KeyError, TypeError):
        fail(f"{path}: not a report of sample_quality.py --json; delete it to judge again")
    if "floor_draws" not in report:  # its floor one fixed slice, its multiples not comparable
        fail(f"{path}: judged by sample_quality.py before its floor became random draws "
             "(2026-12-02); delete it to judge again")
    # each sampler's means over the seeds judged (--judge-flags "--seeds ..."); a report from
    # before those means holds one seed's rows, named as the means are
    samplers = report.get("samplers") or [row for row in report["rows"]
                                          if row["source"].startswith("prior")]
    table, judges = {}, list(floor[0])
    for row in samplers:
        source, mine = row["source"], row["judges"]
        cells = [f"{nll:.1f}"] + [
            f"{100 * mine[j]['agreement']:.1f}%, "
            f"{mine[j]['frechet_distance'] / floor[0][j]['frechet_distance']:.2f}x" for j in judges]
        cells += [f"{mine[judges[0]]['recall']:.3f} ({floor[0][judges[0]]['recall']:.3f})",
                  f"{100 * row['two_sample_accuracy']:.1f}% ({100 * floor[1]:.1f}%)"]
        table[f"{variant} ({source})"] = cells
    return table, judges


def print_prior_table(variants, seed):
    found = [rows for v in variants if (rows := prior_rows(v, seed)) is not None]
    if not found:
        return
    judges = found[0][1]
    print(f"\npriors over seed {seed}'s codes; per judge class agreement and Frechet distance as a "
          f"multiple of the floor's; recall under {judges[0]} and two-sample accuracy (floor)\n")
    print("| quantizer (sampler) | prior test NLL, bits per map | " + " | ".join(judges) +
          " | recall | two-sample |")
    print("| --- " * (len(judges) + 4) + "|")
    for rows, _ in found:
        for label, cells in rows.items():
            print(f"| {label} | " + " | ".join(cells) + " |")


def curves(name):
    """-> {tag: per-epoch values} of one run's test scalars."""
    log_dir = os.path.join("logs", name)
    if not os.path.isdir(log_dir):
        fail(f"{log_dir}: no such folder; the run's TensorBoard events draw the figure")
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0}).Reload()
    return {tag: one_value_per_step(events.Scalars(tag))[1]
            for tag in ("codebook/test/codes_used", "codebook/test/perplexity")}


def saved_metrics(name, file, *keys):
    """The figures `keys` of the metrics models/<name>/<file> saved, or one line naming the file."""
    path = os.path.join("models", name, file)
    metrics = load_checkpoint(path, "vqvae", "run checkpoint").get("metrics") or {}
    missing = [key for key in keys if not isinstance(metrics.get(key), (int, float))]
    if missing:
        fail(f"{path}: its metrics hold no {missing[0]}; delete models/{name}/ to train it again")
    return metrics


def summary(variant, seeds, num_epochs):
    """-> (row of mean, std per figure, per-epoch curves) over the finished seeds, or None."""
    figures, per_epoch = [], []
    for seed in seeds:
        name = run_name(variant, seed)
        if state(name, num_epochs) != "done":
            continue
        seconds = [saved_metrics(name, f"model_{e}.pt", "train_seconds")["train_seconds"]
                   for e in range(1, num_epochs + 1)]
        m = saved_metrics(name, "last.pt", "reconstruction", "codes_used", "perplexity")
        figures.append([m["reconstruction"], m["codes_used"], m["perplexity"],
                        49 * math.log2(m["perplexity"]), float(np.mean(seconds))])
        per_epoch.append(curves(name))
    if not figures:
        return None
    figures = np.array(figures)
    return {"seeds": len(figures), "mean": figures.mean(0).tolist(),
            "std": figures.std(0, ddof=1).tolist() if len(figures) > 1 else [0.0] * 5,
            "curves": {tag: np.mean([c[tag] for c in per_epoch], 0).tolist()
                       for tag in per_epoch[0]}}


def draw(rows, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for variant, row in rows.items():
        for axis, tag in zip(axes, ("codebook/test/codes_used", "codebook/test/perplexity")):
            values = row["curves"][tag]
            axis.plot(range(1, len(values) + 1), values, marker="o", markersize=3,
                      color=COLOURS[variant], label=f"{variant} ({row['seeds']} seeds)")
    for axis, title in zip(axes, ("codes used on the test set", "test perplexity")):
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_write(path) as f:   # a failed call leaves the previous figure whole
        fig.savefig(f, format=figure_format(path), dpi=110)


def figure_format(path):
    """The image format the file name asks for (.png, .pdf, .svg, ...), or one line."""
    suffix = os.path.splitext(path)[1][1:].lower()
    if suffix not in FigureCanvasBase.get_supported_filetypes():
        fail(f"--figure {path}: expected a file name ending in an image format matplotlib writes "
             f"(.png, .pdf, .svg, ...)")
    return suffix


def main():
    p = ArgumentParser(prog="compare_quantizers.py", description="Every quantizer, several seeds.")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=seed_int, default=[0, 1, 2])
    p.add_argument("--num-epochs", type=positive_int, default=10)
    p.add_argument("--report-only", action="store_true", help="train nothing; report finished runs")
    p.add_argument("--figure", default="quantizers.png",
                   help="the figure's file, beside logs/ and models/ (README's: "
                        "readme_images/quantizers.png)")
    p.add_argument("--prior-epochs", type=nonnegative_int, default=0,
                   help="also train and judge one prior per variant (0: none)")
    p.add_argument("--prior-flags", default="", help="more pixelcnn_prior.py flags, one string")
    p.add_argument("--judge-flags", default="", help="more sample_quality.py flags, one string")
    add_data_and_device_flags(p)
    args = p.parse_args()
    args.seeds = list(dict.fromkeys(args.seeds))  # a seed given twice is one run
    check_file_to_write(args.figure, "--figure")   # before hours of training, not after
    figure_format(args.figure)
    for flag in ("prior_flags", "judge_flags"):
        try:
            setattr(args, flag, shlex.split(getattr(args, flag)))
        except ValueError as e:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)!r}: {e}; expected flags as typed "
                 f"in a shell")
    if not args.report_only:
        for seed in args.seeds:  # every variant's seed 0 first: a cut-short sweep stays balanced
            for variant in args.variants:
                train(variant, seed, args)
        for variant in args.variants if args.prior_epochs else ():
            train_and_judge_prior(variant, args.seeds[0], args)
    rows = {v: row for v in args.variants if (row := summary(v, args.seeds, args.num_epochs))}
    if not rows:
        fail("no finished runs to report (train them without --report-only)")
    print(f"\n{args.num_epochs} epochs, mean +- std over the seeds\n")
    print("| quantizer | seeds | test MSE | codes used | perplexity | bits per map | s per epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    formats = ("{:.5f} +- {:.5f}", "{:.0f} +- {:.0f}", "{:.0f} +- {:.0f}", "{:.0f} +- {:.0f}",
               "{:.1f} +- {:.1f}")
    for variant, row in rows.items():
        cells = [f.format(m, s) for f, m, s in zip(formats, row["mean"], row["std"])]
        print(f"| {variant} | {row['seeds']} | " + " | ".join(cells) + " |")
    print_prior_table(args.variants, args.seeds[0])
    draw(rows, args.figure)
    print(f"\nfigure: {args.figure}")
    print(json.dumps({variant: {k: row[k] for k in ("seeds", "mean", "std")}
                      for variant, row in rows.items()}))


if __name__ == "__main__":
    main()
