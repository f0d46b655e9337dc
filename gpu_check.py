"""Run the scripts that train, evaluate, draw, judge and time (VQ-VAE.py, evaluate.py, generate.py,
pixelcnn_prior.py, classifier.py, sample_quality.py, benchmark.py) on a CUDA GPU, as a user would,
and print one table and one JSON line.

    python3 gpu_check.py                  # the first GPU; says so and exits 0 when there is none
    python3 gpu_check.py --device cpu     # the same checks on the CPU, to try the check itself

Each check runs a script in a scratch folder with short settings (a few hundred steps) and reads its
output; the last one is `benchmark.py --full-run`, the whole README-default run. The run with CUDA
graphs must end within 10% of the same run compiled in the default mode. The host-sync
checks run in this process: a few training steps under `torch.cuda.set_sync_debug_mode("error")`,
at the precision --amp picks here for each quantizer and once in fp16 with a GradScaler (what a T4
gets), so a host sync in the step fails the check. The script checks that read no model another
check trains run --jobs at a time. Each row is printed as its check ends, the table and the JSON
line at the end. Exit status 0 when every check passed (or there is no GPU), else 1.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from checkpoints import PRETRAINED
from cli import ArgumentParser, positive_int, resolve_device
from data import MNISTSplit, prepare_mnist
from modules import VQVAEConfig, vqvae_from_config
from training import (GradScaler, loss_weights, make_optimizer, make_precision, make_scheduler,
                      step_scalars, train_step)
from vector_quantizer import QUANTIZERS

REPO = os.path.dirname(os.path.abspath(__file__))
RESULT = {True: "ok", False: "FAILED", None: "not run"}
COMPILED_AMP = "VQ-VAE.py --compile --amp"
GRAPHS = "VQ-VAE.py --compile --compile-mode reduce-overhead --amp (CUDA graphs)"
GRAPHS_TOLERANCE = 0.1  # relative: the same seed, data and steps, other numerics only
SHORT = ["--num-epochs", "1", "--max-steps", "300", "--test-subset", "2000", "--seed", "0",
         "--num-workers", "0"]


def script_checks(device, data, full_run, gpus):
    """(name, command, what to read from its output) for every script; `gpus`: how many this
    machine has (the two-process torchrun check needs two, or runs on the CPU with gloo)."""
    vqvae = [sys.executable, os.path.join(REPO, "VQ-VAE.py"), "--device", device,
             "--data-folder", data]
    script = {name: [sys.executable, os.path.join(REPO, name), "--device", device,
                     "--data-folder", data]
              for name in ("pixelcnn_prior.py", "classifier.py", "generate.py", "evaluate.py",
                           "sample_quality.py", "benchmark.py")}
    cpu_run = [sys.executable, os.path.join(REPO, "VQ-VAE.py"), "--device", "cpu",
               "--data-folder", data, "--output-folder", "moved", "--num-epochs", "1",
               "--train-subset", "2560", "--test-subset", "500", "--lr-schedule", "constant",
               "--seed", "0", "--num-workers", "0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                *vqvae[1:]]
    torchrun_2 = [*torchrun[:4], "--nproc_per_node=2", *torchrun[5:]]
    two_ranks = "torchrun, 2 processes " + ("(gloo)" if device == "cpu" else "(NCCL, SyncBatchNorm)")
    prior = ["--prior-model", "models/prior/best.pt"]
    return [
        ("VQ-VAE.py, eager", [*vqvae, "--output-folder", "eager", *SHORT], epoch_line),
        ("VQ-VAE.py --amp", [*vqvae, "--output-folder", "amp", "--amp", *SHORT], epoch_line),
        ("VQ-VAE.py --compile", [*vqvae, "--output-folder", "compiled", "--compile", *SHORT],
         epoch_line),
        (COMPILED_AMP,
         [*vqvae, "--output-folder", "compiled_amp", "--compile", "--amp", *SHORT], epoch_line),
        (GRAPHS, [*vqvae, "--output-folder", "graphs", "--compile", "--compile-mode",
                  "reduce-overhead", "--amp", *SHORT], epoch_line),
        *[(f"VQ-VAE.py --quantizer {name} --compile --amp",
           [*vqvae, "--output-folder", name, "--quantizer", name, "--compile", "--amp", *SHORT],
           epoch_line) for name in QUANTIZERS[1:]],
        ("VQ-VAE.py --resume of a CPU checkpoint",
         [*vqvae, "--resume", "models/moved/last.pt", "--num-epochs", "2"], epoch_line, cpu_run),
        ("torchrun, 1 process", [*torchrun, "--output-folder", "torchrun", *SHORT], epoch_line),
        (two_ranks, [*torchrun_2, "--output-folder", "torchrun_2", *SHORT], ranks_agree)
        if device == "cpu" or gpus >= 2 else
        (two_ranks, None, f"needs two GPUs, this machine has {gpus}: not checked"),
        ("pixelcnn_prior.py", [*script["pixelcnn_prior.py"], "--vqvae-model", "models/eager/best.pt",
                               "--num-epochs", "1", "--train-subset", "5000", "--test-subset",
                               "1000", "--output-folder", "prior"], last_line),
        ("classifier.py", [*script["classifier.py"], "--num-epochs", "1", "--output-folder",
                           "judge"], last_line),
        *[(f"generate.py --input {source}",
           [*script["generate.py"], "--model", "models/eager/best.pt", "--input", source,
            "--filename", source, *(prior if source == "prior" else [])], last_line)
          for source in ("MNIST", "random", "prior")],
        ("generate.py, prior samples to a file",
         [*script["generate.py"], "--model", "models/eager/best.pt", "--input", "prior", *prior,
          "--num-samples", "1000", "--samples-out", "samples.pt"], last_line),
        ("evaluate.py, committed VQ-VAE",
         [*script["evaluate.py"], "--model", os.path.join(PRETRAINED, "vqvae_mnist.pt"), "--json"],
         lambda out: "test MSE {test_mse:.5f} (CPU: 0.00757), perplexity {perplexity:.1f}".format(
             **json.loads(out))),
        ("sample_quality.py, 1,000 samples",
         [*script["sample_quality.py"], "--model", os.path.join(PRETRAINED, "vqvae_mnist.pt"),
          "--prior-model", os.path.join(PRETRAINED, "prior_mnist.pt"), "--num-samples", "1000",
          "--json"], prior_quality),
        ("benchmark.py --prior-samples 10000" + " --full-run" * full_run,
         [*script["benchmark.py"], "--num-workers", str(max(os.cpu_count() - 1, 0)), "--json",
          "--prior-samples", "10000", *["--full-run"] * full_run], benchmark_figures),
    ]


def epoch_line(out):
    lines = [line for line in out.splitlines() if line.startswith("epoch")]
    precision = re.search(r"seed \d+, (\w+)", out)
    return f"{precision.group(1) if precision else '?'}; {lines[-1]}"


def ranks_agree(out):
    checksums = [line.split()[-1] for line in out.splitlines() if "parameter checksum" in line]
    if len(checksums) != 2 or checksums[0] != checksums[1]:
        raise ValueError(f"the ranks' parameter checksums differ: {checksums}")
    return f"{epoch_line(out)}; both ranks end at parameter checksum {checksums[0]}"


def last_line(out):
    return out.strip().splitlines()[-1]


def prior_quality(out):
    prior = json.loads(out)["samplers"][0]   # generate.py's default sampler, the only one asked
    return f"{prior['source']}: " + "; ".join(
        f"{judge} agreement {100 * figures['agreement']:.1f}%, Frechet "
        f"{figures['frechet_distance']:.2f}" for judge, figures in prior["judges"].items())


def benchmark_figures(out):
    report = json.loads(out)
    rows = "; ".join(f"{row['pipeline'].split(' (')[0]} {row['ms_per_step']:.2f} ms/step "
                     f"({row['images_per_s']:.0f} images/s)" for row in report["rows"])
    full = f"; whole default run {report['full_run_s']:.1f} s" if "full_run_s" in report else ""
    full += f"; 10,000 prior samples {report['prior_samples']['s']:.1f} s"
    return rows + full


def graphs_train_alike(rows):
    """The CUDA-graphs run against the same run compiled in the default mode (seed, data and
    steps alike): a replay that read or wrote stale buffers would finish with another test
    reconstruction error. -> a row, or None when either run failed (its own row says why)."""
    detail = {row["check"]: row["detail"] for row in rows if row["ok"]}
    if GRAPHS not in detail or COMPILED_AMP not in detail:
        return None
    row = {"check": "CUDA graphs train as the default compile mode does", "seconds": 0.0}
    found = [re.search(r"test reconstruction ([\d.]+)", detail[name])
             for name in (GRAPHS, COMPILED_AMP)]
    if not all(found):  # a changed epoch line must not cost the report of the whole run
        lines = [detail[GRAPHS], detail[COMPILED_AMP]]
        return progress({**row, "ok": False,
                         "detail": f"unexpected output: no test reconstruction in {lines}"})
    graphs, compiled = (float(match.group(1)) for match in found)
    return progress({**row, "ok": abs(graphs - compiled) <= GRAPHS_TOLERANCE * compiled,
                     "detail": f"test reconstruction {graphs:.5f} against {compiled:.5f} "
                               f"(tolerance {GRAPHS_TOLERANCE:.0%})"})


def reads_a_model_trained_here(check):
    return any(arg.startswith(("models/eager/", "models/prior/")) for arg in check[1] or [])


def run_check(check, work, timeout):
    """One script check, its `before` commands first -> its row, printed as it ends."""
    name, command, read, *before = check
    if command is None:  # a check this machine cannot run: `read` says why
        return progress({"check": name, "ok": None, "seconds": 0.0, "detail": read})
    ok, seconds, out, err = True, 0.0, "", ""
    for step in [*before, command]:
        ok, step_seconds, out, err = run_script(step, work, timeout)
        seconds += step_seconds
        if not ok:
            break
    try:
        detail = read(out) if ok else (err.strip().splitlines() or ["no output"])[-1]
    except (ValueError, KeyError, IndexError, StopIteration) as e:
        ok, detail = False, f"unexpected output ({type(e).__name__}: {e}): {out.strip()[-200:]}"
    return progress({"check": name, "ok": ok, "seconds": round(seconds, 1), "detail": detail})


def run_script(command, cwd, timeout):
    """-> (ok, seconds, stdout, stderr)."""
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:  # the row shows the last line of stderr: say why there
        return False, time.perf_counter() - started, "", f"timed out after {timeout} s (--timeout)"
    return result.returncode == 0, time.perf_counter() - started, result.stdout, result.stderr


def steps_without_host_sync(device, data, amp_dtype, scaler, quantizer="vq", steps=20):
    """A few VQ-VAE.py training steps (batch, step, schedule, code usage) after a warm-up, with
    CUDA's sync debug mode set to raise: any host sync in them fails. -> detail string."""
    torch.manual_seed(0)
    split = MNISTSplit(data, True, device, limit=128 * (steps + 2))
    model = vqvae_from_config(VQVAEConfig(quantizer=quantizer)).to(device)
    optimizer = make_optimizer(model, 2e-4, device)
    scheduler = make_scheduler(optimizer, "cosine", steps + 2)
    batches = split.batches(128, torch.randperm(len(split)))
    pending = []
    for i, (images, _) in enumerate(batches):
        if i == 2:  # the first steps allocate and run the k-means init: warm-up
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
        losses = train_step(model, optimizer, scaler, images, loss_weights(1.0), amp_dtype)
        scheduler.step()
        pending.append(step_scalars(losses, model.codeBook.K, model.codeBook.loss_names))
    torch.cuda.set_sync_debug_mode("default")
    loss = torch.stack(pending)[-1, 0].item()
    return f"{steps} steps, {str(amp_dtype or torch.float32).split('.')[1]}, loss {loss:.4f}"


def main():
    p = ArgumentParser(prog="gpu_check.py", description="Run the training, drawing, judging and timing scripts on a CUDA GPU.")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu to try the check")
    p.add_argument("--timeout", type=positive_int, default=240, help="seconds per check")
    p.add_argument("--no-full-run", action="store_true",
                   help="benchmark.py without --full-run (default on the CPU: 10 epochs take long)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder and print it")
    p.add_argument("--jobs", type=positive_int, default=max(1, min(4, (os.cpu_count() or 1) // 4)),
                   help="script checks run at a time (default: a quarter of the CPU cores, 1 to 4)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA GPU on this machine, nothing was checked "
              "(`--device cpu` runs the same checks on the CPU)")
        print(json.dumps({"gpu_check": {"gpu": None, "torch": torch.__version__, "checks": []}}))
        return
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    work = tempfile.mkdtemp(prefix="gpu_check-")
    data = os.path.join(work, "data")
    prepare_mnist(data)
    gpus = torch.cuda.device_count() if cuda else 0
    *scripts, benchmark = script_checks(str(device), data, cuda and not args.no_full_run, gpus)
    # Checks that read no model another check trains run --jobs at a time (compiling is most of
    # their time, and it is CPU work); then, in order, those that do, and benchmark.py alone.
    later = [check for check in scripts if reads_a_model_trained_here(check)]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda check: run_check(check, work, args.timeout),
                             [check for check in scripts if check not in later]))
    rows += [run_check(check, work, args.timeout) for check in [*later, benchmark]]
    rows += [row for row in [graphs_train_alike(rows)] if row]
    if cuda:
        amp_dtype, scaler = make_precision(device, True)
        checks = [("training step free of host syncs, --amp", (amp_dtype, scaler), "vq"),
                  ("training step free of host syncs, fp16 + GradScaler (T4 path)",
                   (torch.float16, GradScaler(enabled=True)), "vq"),
                  *[(f"training step free of host syncs, --quantizer {name} --amp",
                     (amp_dtype, scaler), name) for name in QUANTIZERS[1:]]]
        for name, precision, quantizer in checks:
            started = time.perf_counter()
            try:
                ok, detail = True, steps_without_host_sync(device, data, *precision, quantizer)
            except RuntimeError as e:
                torch.cuda.set_sync_debug_mode("default")
                ok, detail = False, str(e).splitlines()[0]
            rows.append(progress({"check": name, "ok": ok, "detail": detail,
                                  "seconds": round(time.perf_counter() - started, 1)}))
    report_and_exit(rows, device, work, args.keep)


def progress(row):
    """Print one check's row as soon as it is done (a run cut short still shows its rows) -> row."""
    print(f"{RESULT[row['ok']]:7} {row['seconds']:6.1f} s  {row['check']}: {row['detail']}",
          flush=True)
    return row


def report_and_exit(rows, device, work, keep):
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    capability = list(torch.cuda.get_device_capability(device)) if gpu else None
    print(f"\n{gpu or 'CPU'}  compute capability {capability}  torch {torch.__version__}")
    print("| check | result | seconds | figures or error |\n| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['check']} | {RESULT[row['ok']]} | {row['seconds']} | {row['detail']} |")
    failed = sum(row["ok"] is False for row in rows)
    passed = sum(row["ok"] is True for row in rows)
    print(json.dumps({"gpu_check": {"device": str(device), "gpu": gpu, "capability": capability,
                                    "torch": torch.__version__, "passed": passed,
                                    "failed": failed, "not_run": len(rows) - passed - failed,
                                    "checks": rows}}))
    if keep:
        print(f"scratch folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
