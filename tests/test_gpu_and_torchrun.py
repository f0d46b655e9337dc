"""torchrun (DistributedDataParallel on the CPU, fresh data folders, stops reaching every rank),
gpu_check.py without a GPU, and benchmark.py's figures."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY, assert_clean_failure, load_script, run
from modules import VQVAEConfig, vqvae_from_config


def test_torchrun_ddp_on_cpu_matches_single_process(tmp_path):
    """torchrun with 2 processes, from a fresh --data-folder that both prepare at once, ends with
    identical replicas, close to a single process trained on the same global batches."""
    flags = ["--data-folder", "fresh", "--num-epochs", "1", "--max-steps", "8",
             "--codebook-init", "uniform", "--dead-code-threshold", "0", *TINY,
             # The EMA codebook dominates the comparison below; at decay 0.9 the per-rank
             # BatchNorm differences reach it 10x faster than at the 0.99 the bound was set for.
             "--ema-decay", "0.99"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", os.path.join(REPO, "VQ-VAE.py"),
                             "--output-folder", "ddp", *flags], cwd=tmp_path, capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checksums = sorted(line for line in result.stdout.splitlines() if "parameter checksum" in line)
    assert len(checksums) == 2  # one per rank, and the replicas ended identical:
    assert checksums[0].split()[-1] == checksums[1].split()[-1], checksums
    run("VQ-VAE.py", "--output-folder", "single", *flags, cwd=tmp_path)
    ddp = torch.load(tmp_path / "models/ddp/last.pt", weights_only=True)
    single = torch.load(tmp_path / "models/single/last.pt", weights_only=True)
    assert ddp["step"] == single["step"] == 8
    torch.manual_seed(3)
    init = vqvae_from_config(VQVAEConfig(**single["model_config"])).state_dict()
    keys = [name for name, _ in vqvae_from_config(VQVAEConfig(**single["model_config"]))
            .named_parameters()]
    # Same global batch of 64 split 32 + 32: the updates agree up to per-rank BatchNorm statistics
    # (SyncBatchNorm is used on GPUs only), so compare the size of the parameter updates.
    difference = sum((ddp["state_dict"][k] - single["state_dict"][k]).pow(2).sum() for k in keys)
    update = sum((single["state_dict"][k] - init[k]).pow(2).sum() for k in keys)
    assert (difference / update).sqrt() < 0.25


def rank_process(cwd, rank):
    """The pid of the torchrun worker of `rank` running in folder `cwd` (Linux /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd") != str(cwd):
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return int(pid)
        except OSError:
            continue
    raise AssertionError(f"no rank {rank} process in {cwd}")


def catches_signal(pid, signum):
    """Whether process `pid` has a handler for `signum` (Linux /proc: the SigCgt mask)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask >> (signum - 1) & 1)


def test_torchrun_stop_reaches_every_rank_and_default_codebook_stays_in_step(tmp_path):
    """Default flags (k-means init, dead-code restart: rank 0's broadcasts), from a fresh
    --data-folder that both ranks prepare at once. SIGTERM to rank 1 alone: both ranks stop at the
    same step, rank 0 writes last.pt, both leave the process group; the resumed run ends with
    identical parameters on both ranks."""
    flags = ["--data-folder", "fresh", "--num-epochs", "2", *TINY, "--log-every", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.join(REPO, "VQ-VAE.py")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([*torchrun, "--output-folder", "ddp", *flags], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().startswith("training")
    rank_1 = rank_process(tmp_path, 1)
    deadline = time.time() + 60
    while not catches_signal(rank_1, signal.SIGTERM) and time.time() < deadline:
        time.sleep(0.05)  # until rank 1's TrainingRun has its handler: SIGTERM then stops, not kills
    os.kill(rank_1, signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    stops = sorted(line for line in stderr.splitlines() if "stopped by signal 15" in line)
    assert [line.split()[1] for line in stops] == ["0", "1"], stderr[-3000:]
    step = int(stops[0].split()[-1])
    assert stops[1].split()[-1] == str(step)  # the same step on both ranks
    assert "torchrun --nproc_per_node=2 VQ-VAE.py --resume models/ddp/last.pt" in stderr
    cut = torch.load(tmp_path / "models" / "ddp" / "last.pt", weights_only=True)
    assert cut["step"] == step and 0 < step < 32
    result = subprocess.run([*torchrun, "--resume", "models/ddp/last.pt", "--data-folder",
                             "fresh"], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checksums = sorted(line for line in result.stdout.splitlines() if "parameter checksum" in line)
    assert len(checksums) == 2 and checksums[0].split()[-1] == checksums[1].split()[-1], checksums
    assert torch.load(tmp_path / "models" / "ddp" / "last.pt", weights_only=True)["step"] == 32



def test_a_refusal_by_rank_0_stops_every_rank_in_one_line(tmp_path, data_folder):
    """Only rank 0 claims the run folder: when another run holds it, every process stops with
    rank 0's one line (rank 1 used to go on into DDP and die with a gloo traceback)."""
    from files import claim_folder
    (tmp_path / "models" / "b").mkdir(parents=True)
    claim = claim_folder(str(tmp_path / "models" / "b"))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(REPO, "VQ-VAE.py"), "--output-folder", "b", "--data-folder", data_folder,
         *TINY], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    claim.release()
    assert result.returncode != 0
    assert result.stderr.count("error: --output-folder b: another run is writing") == 1, \
        result.stderr[-3000:]
    assert "[rank1]" not in result.stderr and "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "models" / "b")) == [".run.lock"]


def test_a_last_batch_smaller_than_the_processes_is_refused(tmp_path, monkeypatch, capsys):
    """Under 2 processes, --train-subset 129 at batch 128 would leave rank 1 an empty last batch (a
    NaN loss at the epoch's end): refused in one line before any data is read."""
    vqvae = load_script("VQ-VAE.py")
    monkeypatch.setattr(vqvae, "setup_distributed", lambda device: (0, 2, device))
    monkeypatch.chdir(tmp_path)
    args, checkpoint = vqvae.parse_args(["--train-subset", "129", "--data-folder", "fresh"])
    with pytest.raises(SystemExit) as exit_info:
        vqvae.main(args, checkpoint)
    assert exit_info.value.code == 2
    assert "--train-subset 129 with --batch-size 128" in capsys.readouterr().err
    assert not os.listdir(tmp_path)

def test_benchmark_reports_both_pipelines(tmp_path, data_folder, monkeypatch):
    modes = []  # --compile-mode reaches torch.compile (here a stand-in: compiling takes a minute)
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: modes.append(mode) or fn)
    result = run("benchmark.py", "--data-folder", data_folder, "--steps", "2", "--warmup", "1",
                 "--num-workers", "0", "--prior-samples", "20", "--quantizers", "lfq", "--json",
                 "--compile", "--compile-mode", "reduce-overhead", cwd=tmp_path)
    assert modes.count("reduce-overhead") == 2, modes  # the fast path, then with --quantizer lfq
    report = json.loads(result.stdout)
    assert [row["pipeline"].split()[0] for row in report["rows"]] == ["original-style", "fast",
                                                                      "fast"]
    assert report["rows"][2]["pipeline"].endswith("--quantizer lfq")
    for row in report["rows"]:  # figures are printed, never asserted on
        assert row["ms_per_step"] > 0 and row["images_per_s"] > 0 and row["s_per_epoch"] > 0
    assert report["speedup"] > 0
    assert report["prior_samples"]["n"] == 20 and report["prior_samples"]["s"] > 0
    assert "prior samples" in load_script("gpu_check.py").benchmark_figures(result.stdout)


def test_benchmark_times_steps_past_one_epoch():
    """--warmup + --steps past one epoch's batches (a large --batch-size) go on into the next."""
    class ThreeBatches:
        def __len__(self):
            return 3

        def batches(self, batch_size, order):
            return iter(order.tolist())
    batches = load_script("benchmark.py").endless_batches(ThreeBatches(), 1)
    assert sorted(next(batches) for _ in range(6)) == [0, 0, 1, 1, 2, 2]


def test_compile_mode_reaches_torch_compile(monkeypatch, tmp_path, data_folder):
    """VQ-VAE.py's --compile-mode reaches torch.compile (reduce-overhead: CUDA graphs on a GPU,
    README "GPUs and"; benchmark.py's: its test); under torchrun that mode is refused in one line,
    and so is --compile-mode without --compile in benchmark.py (VQ-VAE.py's: test_vqvae_script)."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: modes.append(mode) or fn)
    graphs = ["--compile", "--compile-mode", "reduce-overhead"]
    run("VQ-VAE.py", "--data-folder", data_folder, "--output-folder", "graphs", *graphs,
        "--num-epochs", "1", "--max-steps", "1", *TINY, cwd=tmp_path)
    assert modes.count("reduce-overhead") == 1, modes
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run("VQ-VAE.py", *graphs, "--output-folder", "ddp", cwd=tmp_path, check=False)
    assert_clean_failure(result, "--compile-mode reduce-overhead", "torchrun")
    assert not (tmp_path / "models" / "ddp").exists()
    result = run("benchmark.py", "--compile-mode", "reduce-overhead", cwd=tmp_path, check=False)
    assert_clean_failure(result, "--compile-mode reduce-overhead", "applies with --compile")


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs every script for minutes on a GPU")
def test_gpu_check_says_there_is_no_gpu_and_exits_0(tmp_path):
    result = run("gpu_check.py", cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    first, report = result.stdout.strip().splitlines()
    assert "no CUDA GPU" in first
    assert json.loads(report)["gpu_check"]["checks"] == []
    assert os.listdir(tmp_path) == []


def test_gpu_check_runs_torchrun_with_two_processes_or_says_it_needs_two_gpus():
    import importlib
    gpu_check = importlib.import_module("gpu_check")
    for device, gpus in (("cuda", 2), ("cuda", 1), ("cpu", 0)):
        rows = {name: rest for name, *rest in gpu_check.script_checks(device, "data", False, gpus)}
        two = next(name for name in rows if name.startswith("torchrun, 2 processes"))
        command, read = rows[two][:2]
        if gpus == 1:
            assert command is None and "needs two GPUs" in read
        else:
            assert "--nproc_per_node=2" in command and read is gpu_check.ranks_agree
    with pytest.raises(ValueError):
        gpu_check.ranks_agree("rank 0 parameter checksum 1.0\nrank 1 parameter checksum 1.5\n")


def test_gpu_check_runs_side_by_side_only_what_needs_no_model_trained_there():
    """The checks that read the eager VQ-VAE or the prior trained by other checks wait for them."""
    gpu_check = load_script("gpu_check.py")
    *scripts, benchmark = gpu_check.script_checks("cuda", "data", False, 1)
    later = [check[0] for check in scripts if gpu_check.reads_a_model_trained_here(check)]
    assert later[0] == "pixelcnn_prior.py" and len(later) == 5
    assert all(name.startswith("generate.py") for name in later[1:])
    assert benchmark[0].startswith("benchmark.py")


def test_gpu_check_compares_the_cuda_graphs_run_with_the_default_compile_mode():
    gpu_check = load_script("gpu_check.py")
    names = [check[0] for check in gpu_check.script_checks("cuda", "data", False, 1)]
    assert gpu_check.GRAPHS in names and gpu_check.COMPILED_AMP in names

    def rows(graphs_error, graphs_ok=True):
        line = "bf16; epoch 1/1  step 300  test reconstruction {:.5f}  quantization 0.01"
        return [{"check": gpu_check.COMPILED_AMP, "ok": True, "detail": line.format(0.02)},
                {"check": gpu_check.GRAPHS, "ok": graphs_ok, "detail": line.format(graphs_error)}]
    assert gpu_check.graphs_train_alike(rows(0.0205))["ok"] is True
    assert gpu_check.graphs_train_alike(rows(0.05))["ok"] is False
    assert gpu_check.graphs_train_alike(rows(0.05, graphs_ok=False)) is None
    changed = rows(0.02)
    changed[1]["detail"] = "bf16; epoch 1/1  step 300  test MSE 0.02"
    assert gpu_check.graphs_train_alike(changed)["ok"] is False
