"""VQ-VAE.py and evaluate.py end to end, as a user runs them: files, TensorBoard, reproducibility,
the original's configuration, bad flags."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import (CONSTANT_LR, ORIGINAL_CONFIGURATION, TINY, assert_clean_failure,
                      assert_same_weights, run, run_files)


def test_training_script_writes_logs_and_checkpoints(trained_run):
    cwd, result = trained_run
    files = run_files(cwd / "models" / "tiny")
    assert files == ["best.pt", "last.pt", "model_1.pt", "model_2.pt"]
    assert "epoch 2/2" in result.stdout and "perplexity" in result.stdout
    checkpoint = torch.load(cwd / "models" / "tiny" / "last.pt", weights_only=True)
    assert checkpoint["model_config"]["k"] == 32 and checkpoint["epoch"] == 2
    assert checkpoint["run_config"]["k"] == 32 and checkpoint["run_config"]["num_epochs"] == 2
    assert "lr" not in checkpoint["model_config"]  # the model apart from the command line
    assert checkpoint["step"] == 2 * 1024 // 64


def test_tensorboard_tags(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cwd, _ = trained_run
    events = EventAccumulator(str(cwd / "logs" / "tiny"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    for tag in ("loss/train/reconstruction", "loss/train/quantization", "loss/train/training_loss",
                "loss/test/reconstruction", "loss/test/quantization", "loss/testing_loss",
                "codebook/train/perplexity", "codebook/train/codes_used",
                "codebook/test/perplexity", "codebook/test/codes_used", "codebook/test/dead_codes"):
        assert tag in tags["scalars"], tag
    assert len(events.Scalars("loss/train/training_loss")) == 32  # every step
    assert [e.step for e in events.Scalars("loss/testing_loss")] == [1, 2]
    assert {"original", "reconstruction"} <= set(tags["images"])
    assert [e.step for e in events.Images("reconstruction")] == [0, 1, 2]
    assert "codebook/test/usage" in tags["histograms"]
    assert tags["graph"]


@pytest.mark.parametrize("args, word", [
    (["--k", "0"], "--k"),
    (["--hidden-size", "-4"], "--hidden-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--num-epochs", "-1"], "--num-epochs"),
    (["--num-epochs", "0"], "--num-epochs"),
    (["--seed", str(2 ** 32)], "--seed"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--beta", "0"], "--beta"),
    (["--beta", "-1"], "--beta"),
    (["--beta", "inf"], "--beta"),
    (["--k", "many"], "--k"),
    (["--k", "2000000000"], "from 1 to 65,536"),           # memory would run out mid-run
    (["--hidden-size", "100000000"], "from 1 to 4,096"),
    (["--num-workers", "-1"], "--num-workers"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--codebook", "magic"], "--codebook"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:7"], "--device"),
    (["--output-folder", "../escape"], "--output-folder"),
    (["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead applies with"),
    (["--compile", "--compile-mode", "fastest"], "--compile-mode"),
])
def test_training_rejects_bad_flags(tmp_path, data_folder, args, word):
    result = run("VQ-VAE.py", "--data-folder", data_folder, *args, cwd=tmp_path, check=False)
    assert_clean_failure(result, word)
    assert not (tmp_path / "models").exists()


def test_training_rejects_unwritable_output(tmp_path, data_folder):
    """A file where a run folder should be: one line, the file kept, and no other folder made
    (logs/<name> is checked with models/<name> before either is created)."""
    (tmp_path / "models").write_text("a file where the models folder should be")
    result = run("VQ-VAE.py", "--data-folder", data_folder, *TINY, cwd=tmp_path, check=False)
    assert_clean_failure(result, "models", "is a file")
    assert (tmp_path / "models").read_text().startswith("a file")
    assert not (tmp_path / "logs").exists()


def test_same_seed_on_the_original_pipeline_trains_bit_identically(trained_run, tmp_path, data_folder):
    """A fresh run with the shared run's seed, on the original's torchvision DataLoader pipeline,
    ends with exactly its weights: a seed fixes the run, and the fast input path changes speed
    only."""
    cwd, _ = trained_run
    run("VQ-VAE.py", "--output-folder", "tiny", "--data-folder", data_folder, "--num-epochs", "2",
        *TINY, *CONSTANT_LR, "--data-pipeline", "torchvision", "--num-workers", "1", cwd=tmp_path)
    assert_same_weights(cwd / "models" / "tiny" / "last.pt", tmp_path / "models" / "tiny" / "last.pt")


def test_original_configuration_still_trains(tmp_path, data_folder):
    run("VQ-VAE.py", "--output-folder", "seedcfg", "--data-folder", data_folder,
        *ORIGINAL_CONFIGURATION, "--num-epochs", "1", *TINY, cwd=tmp_path)
    checkpoint = torch.load(tmp_path / "models" / "seedcfg" / "best.pt", weights_only=True)
    from modules import ORIGINAL_CONFIG
    from dataclasses import asdict
    assert checkpoint["model_config"] == {**asdict(ORIGINAL_CONFIG), "hidden_size": 16, "k": 32,
                                          "ema_decay": 0.9}
    assert checkpoint["run_config"]["lr_schedule"] == "constant"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "logs" / "seedcfg")).Reload()
    losses = [e.value for e in events.Scalars("loss/train/reconstruction")]
    assert len(losses) == 16 and np.mean(losses[-4:]) < 0.95 * np.mean(losses[:4])  # it learns


def test_evaluate_prints_all_fields(trained_run, data_folder):
    cwd, _ = trained_run
    result = run("evaluate.py", "--model", "models/tiny/best.pt", "--data-folder", data_folder,
                 "--test-subset", "256", cwd=cwd)
    for field in ("test MSE", "PSNR", "codes used", "perplexity", "bits per code map"):
        assert field in result.stdout
    result = run("evaluate.py", "--model", "models/tiny/best.pt", "--data-folder", data_folder,
                 "--test-subset", "256", "--json", cwd=cwd)
    metrics = json.loads(result.stdout)
    saved = torch.load(cwd / "models" / "tiny" / "best.pt", weights_only=True)["metrics"]
    assert metrics["test_mse"] == pytest.approx(saved["reconstruction"], rel=1e-5)
    assert metrics["psnr_db"] == pytest.approx(10 * np.log10(4 / metrics["test_mse"]))
    assert metrics["bits_per_map_uniform"] == pytest.approx(49 * 5)  # K = 32
    assert 1 <= metrics["perplexity"] <= metrics["codes_used"] <= 32


def test_tensorboard_server_serves_the_logs(trained_run):
    import socket
    import time
    import urllib.parse
    import urllib.request
    cwd, _ = trained_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir",
                               str(cwd / "logs" / "tiny"), "--host", "127.0.0.1", "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    query = urllib.parse.urlencode({"run": ".", "tag": "loss/testing_loss"})
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}"
    try:
        deadline, points = time.time() + 90, None
        while time.time() < deadline and not points:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    points = json.loads(response.read())
            except OSError:
                time.sleep(1)
        assert points and [p[1] for p in points] == [1, 2]  # (wall time, step, value) per epoch
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_readme_figures_are_drawn_from_a_runs_events(trained_run, tmp_path):
    """readme_figures.py draws both PNGs from a run's event files; a folder of events without the
    code-usage histogram, or an output folder that is a file, is one line and writes nothing."""
    cwd, _ = trained_run
    logs = str(cwd / "logs" / "tiny")
    run("readme_figures.py", "--original-run", logs, "--default-run", logs, "--output-folder",
        "figures", cwd=tmp_path)
    for name in ("test_curves.png", "code_usage.png"):
        assert (tmp_path / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    partial = tmp_path / "partial"
    partial.mkdir()
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(partial) as writer:
        for tag in ("loss/testing_loss", "codebook/test/perplexity"):
            writer.add_scalar(tag, 1.0, 1)
    result = run("readme_figures.py", "--original-run", str(partial), "--default-run", logs,
                 "--output-folder", "other", cwd=tmp_path, check=False)
    assert_clean_failure(result, str(partial), "codebook/test/usage")
    (tmp_path / "a_file").write_text("")
    result = run("readme_figures.py", "--original-run", logs, "--default-run", logs,
                 "--output-folder", "a_file", cwd=tmp_path, check=False)
    assert_clean_failure(result, "a_file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "figures", "partial"]
