"""The quantizers of `VQ-VAE.py --quantizer` (vector_quantizer.py): one interface, each one's own
math (FSQ's grid, LFQ's entropy term, SimVQ's frozen base), their flags, and every script
downstream of a VQ-VAE trained with each."""
import json
import math
import shutil
from dataclasses import asdict

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from checkpoints import load_vqvae
from conftest import PRETRAINED_VQVAE, assert_clean_failure, assert_same_weights, run
from modules import VQVAEConfig, vqvae_from_config
from training import loss_weights, vqvae_losses
from vector_quantizer import (QUANTIZERS, FiniteScalarQuantizer, LookupFreeQuantizer, SimVQ,
                              VQEmbedding, make_quantizer)

SMALL = {"vq": {}, "fsq": {"fsq_levels": (8, 4)}, "lfq": {}, "simvq": {}}  # each K = 32


def small_model(quantizer):
    torch.manual_seed(0)
    return vqvae_from_config(VQVAEConfig(hidden_size=16, k=32, quantizer=quantizer,
                                         **SMALL[quantizer]))


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_every_quantizer_has_the_interface(quantizer):
    """Indices (B, 7, 7) in [0, K); codes the size of z_e(x); the decoder's gradient reaches the
    encoder; decoding the indices gives exactly the codes the decoder got."""
    model = small_model(quantizer)
    images = torch.rand(8, 1, 28, 28) * 2 - 1
    x_tilde, quantized = model(images, return_quantized=True)
    assert quantized.indices.shape == (8, 7, 7) and quantized.indices.dtype == torch.int64
    assert 0 <= quantized.indices.min() and quantized.indices.max() < model.codeBook.K == 32
    assert quantized.codes.shape == quantized.z_q_x.shape == (8, 16, 7, 7)
    assert set(quantized.losses) == set(model.codeBook.loss_names)
    x_tilde.pow(2).mean().backward()  # the reconstruction alone
    assert model.encoder[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        quantized = model.codeBook.quantize(model.encoder(images))
        assert torch.equal(model.codeBook.codewords(quantized.indices), quantized.codes)
        assert torch.equal(model.codeBook(model.encoder(images)), quantized.indices)
        torch.testing.assert_close(model.decode(quantized.indices), model.decoder(quantized.codes),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_quantizer_arithmetic_stays_float32_under_autocast(quantizer):
    model = small_model(quantizer)
    with torch.autocast("cpu", torch.bfloat16):
        z_e_x = model.encoder(torch.rand(4, 1, 28, 28))
        quantized = model.codeBook.quantize(z_e_x)
    assert quantized.error.dtype == torch.float32
    assert all(term.dtype == torch.float32 for term in quantized.losses.values())


def test_fsq_codes_lie_on_its_grid():
    levels = (8, 5, 5, 5)
    fsq = FiniteScalarQuantizer(16, levels)
    points = []
    fsq.project_out.register_forward_hook(lambda module, inputs, output: points.append(inputs[0]))
    fsq.quantize(torch.randn(64, 16, 7, 7) * 5)
    point = points[0].permute(0, 2, 3, 1).reshape(-1, 4)
    for i, L in enumerate(levels):
        level = point[:, i] * (L // 2) + L // 2  # back to 0 .. L-1
        assert torch.equal(level, level.round()) and level.min() >= 0 and level.max() <= L - 1
        assert len(level.unique()) == L  # inputs this wide reach every level
    every = fsq.grid(torch.arange(fsq.K))
    assert fsq.K == 1000 and len(every.unique(dim=0)) == 1000  # one index, one grid point


def test_lfq_entropy_term_is_at_its_extremes():
    """-log K for confident assignments spread evenly over the K codes; 0 for a collapsed batch."""
    lfq = LookupFreeQuantizer(32, 16)
    every_code = lfq.signs(torch.arange(32))                                # (32, 5)
    assert lfq.entropy_loss(every_code).item() == pytest.approx(-math.log(32), abs=1e-4)
    assert lfq.entropy_loss(every_code[[7] * 32]).item() == pytest.approx(0, abs=1e-4)
    assert -math.log(32) < lfq.entropy_loss(torch.randn(64, 5) * 0.01).item() < 0


def test_simvq_base_stays_frozen_while_its_map_trains():
    torch.manual_seed(0)
    simvq = SimVQ(32, 16)
    base, weight = simvq.base.clone(), simvq.map.weight.detach().clone()
    assert "base" in simvq.state_dict() and all(p is not simvq.base for p in simvq.parameters())
    optimizer = torch.optim.Adam(simvq.parameters(), lr=1e-2)
    quantized = simvq.quantize(torch.randn(4, 16, 7, 7))
    sum(quantized.losses.values()).backward()
    optimizer.step()
    assert torch.equal(simvq.base, base) and not torch.equal(simvq.map.weight, weight)


def test_checkpoints_from_before_the_flag_load_as_vq(tmp_path):
    """The committed file (a command line as its config) and a model_config without the field."""
    model, checkpoint = load_vqvae(PRETRAINED_VQVAE, "cpu")
    assert "quantizer" not in checkpoint["config"] and isinstance(model.codeBook, VQEmbedding)
    config = {k: v for k, v in asdict(VQVAEConfig()).items() if k not in ("quantizer", "fsq_levels")}
    torch.save({"kind": "vqvae", "model_config": config, "state_dict": model.state_dict()},
               tmp_path / "old.pt")
    assert isinstance(load_vqvae(str(tmp_path / "old.pt"), "cpu")[0].codeBook, VQEmbedding)


def test_lfq_and_fsq_refuse_a_codebook_they_cannot_have():
    with pytest.raises(ValueError, match="power of two"):
        make_quantizer("lfq", 48, 16)
    with pytest.raises(ValueError, match="not 48"):
        make_quantizer("fsq", 48, 16, fsq_levels=(8, 8))


@pytest.mark.parametrize("flags, words", [
    (["--quantizer", "fsq", "--codebook", "ema"], ["--codebook applies to --quantizer vq"]),
    (["--quantizer", "simvq", "--dead-code-threshold", "2"], ["--dead-code-threshold", "vq"]),
    (["--fsq-levels", "8", "8"], ["--fsq-levels applies to --quantizer fsq, not --quantizer vq"]),
    (["--quantizer", "fsq", "--lfq-entropy-weight", "0.1"], ["--lfq-entropy-weight", "lfq"]),
    (["--quantizer", "fsq", "--k", "100"], ["--k 100", "product", "512"]),
    (["--quantizer", "lfq", "--k", "500"], ["--k 500", "power of two"]),
    (["--quantizer", "lfq", "--k", "1"], ["--k 1", "power of two"]),
    (["--quantizer", "fsq", "--fsq-levels", "1", "8"], ["--fsq-levels 1 8", "from 2"]),
    (["--quantizer", "fsq", "--fsq-levels", "1024"], ["--fsq-levels 1024", "from 2 to 1000"]),
    (["--quantizer", "fsq", "--fsq-levels", "1000", "1000"], ["at most 65536"]),
    (["--quantizer", "fsq", "--beta", "0.5"], ["--beta applies to --quantizer vq or lfq or simvq"]),
])
def test_options_of_another_quantizer_are_refused(tmp_path, flags, words):
    result = run("VQ-VAE.py", "--output-folder", "refused", *flags, cwd=tmp_path, check=False)
    assert_clean_failure(result, *words)
    assert not (tmp_path / "models").exists()


def test_weights_and_losses_of_each_quantizer():
    """LFQ's loss adds beta x commitment and its entropy at its own weight; FSQ has no auxiliary loss."""
    images = torch.rand(4, 1, 28, 28) * 2 - 1
    lfq = vqvae_losses(small_model("lfq"), images, loss_weights(0.5, entropy_weight=0.2))
    torch.testing.assert_close(lfq.loss, lfq.reconstruction + 0.5 * lfq.terms["commitment"]
                               + 0.2 * lfq.terms["entropy"])
    fsq = vqvae_losses(small_model("fsq"), images, loss_weights(1.0))
    assert fsq.terms == {} and torch.equal(fsq.loss, fsq.reconstruction)


QUANTIZER_RUN = ["--hidden-size", "16", "--batch-size", "64", "--train-subset", "128",
                 "--test-subset", "64", "--num-workers", "0", "--seed", "5",
                 "--lr-schedule", "constant"]


@pytest.mark.parametrize("quantizer, flags", [("lfq", ["--k", "32"]), ("simvq", ["--k", "32"])])
def test_each_quantizer_trains_resumes_and_evaluates(tmp_path, data_folder, quantizer, flags):
    """(fsq: in the next test) Train with one flag; model_1.pt resumed to 2 epochs ends
    bit-identical; its own losses and the codebook statistics are in TensorBoard; evaluate.py
    reads it."""
    train_resume_and_evaluate(tmp_path, data_folder, quantizer, flags)


def train_resume_and_evaluate(tmp_path, data_folder, quantizer, flags):
    run("VQ-VAE.py", "--output-folder", "whole", "--num-epochs", "2", "--data-folder", data_folder,
        "--quantizer", quantizer, *flags, *QUANTIZER_RUN, cwd=tmp_path)
    (tmp_path / "models" / "cut").mkdir()
    shutil.copy(tmp_path / "models/whole/model_1.pt", tmp_path / "models/cut/last.pt")
    run("VQ-VAE.py", "--resume", "models/cut/last.pt", "--num-epochs", "2", "--data-folder",
        data_folder, "--output-folder", "cut", cwd=tmp_path)
    assert_same_weights(tmp_path / "models/whole/last.pt", tmp_path / "models/cut/last.pt")
    checkpoint = torch.load(tmp_path / "models/whole/last.pt", weights_only=True)
    assert checkpoint["model_config"]["quantizer"] == quantizer
    events = EventAccumulator(str(tmp_path / "logs" / "whole")).Reload()
    names = vqvae_from_config(VQVAEConfig(**checkpoint["model_config"])).codeBook.loss_names
    for tag in ("loss/train/quantization", *(f"loss/train/{name}" for name in names),
                "codebook/train/perplexity", "codebook/test/codes_used"):
        assert tag in events.Tags()["scalars"], tag
    evaluation = json.loads(run("evaluate.py", "--model", "models/whole/best.pt", "--data-folder",
                                data_folder, "--json", "--test-subset", "64",
                                cwd=tmp_path).stdout)
    assert evaluation["k"] == 32 and 1 <= evaluation["codes_used"] <= 32
    assert evaluation["bits_per_map_uniform"] == 49 * 5


def test_generation_and_a_prior_over_fsq_codes(tmp_path, data_folder):
    """FSQ as the other quantizers above; then generate.py (MNIST, random, prior) and
    pixelcnn_prior.py over its indices, whose codebook is implicit (every other quantizer's
    codewords go through the same `codewords`)."""
    train_resume_and_evaluate(tmp_path, data_folder, "fsq", ["--fsq-levels", "8", "4"])
    result = run("VQ-VAE.py", "--resume", "models/whole/last.pt", "--fsq-levels", "4", "8",
                 "--data-folder", data_folder, cwd=tmp_path, check=False)
    assert_clean_failure(result, "--fsq-levels 4 8 conflicts", "trained with 8 4")
    model = "models/whole/best.pt"
    for source in ("MNIST", "random"):
        run("generate.py", "--model", model, "--input", source, "--data-folder", data_folder,
            "--filename", source, cwd=tmp_path)
    run("pixelcnn_prior.py", "--vqvae-model", model, "--data-folder", data_folder,
        "--train-subset", "256", "--hold-out", "64", "--test-subset", "64", "--num-layers", "2",
        "--channels", "16", "--num-epochs", "1", "--output-folder", "prior", cwd=tmp_path)
    run("generate.py", "--model", model, "--input", "prior", "--prior-model",
        "models/prior/best.pt", "--filename", "prior", "--data-folder", data_folder, cwd=tmp_path)
    assert all((tmp_path / "generatedImages" / f"{name}.png").exists()
               for name in ("MNIST", "random", "prior"))


def test_compare_quantizers_trains_what_is_missing_and_reports(tmp_path, data_folder):
    """compare_quantizers.py over a VQ-VAE run it finds in this folder (trained by hand here: it
    trains no VQ-VAE again) and a prior over that run's codes by the same command, judged: both
    tables and the figure; a second call finds everything done and only reports."""
    result = run("compare_quantizers.py", "--report-only", "--figure", "q.png", cwd=tmp_path,
                 check=False)
    assert_clean_failure(result, "no finished runs")
    for figure, words in (("q.jpgx", "image format"), (".", "is a folder")):  # before any training
        result = run("compare_quantizers.py", "--variants", "lfq", "--seeds", "0", "--figure",
                     figure, cwd=tmp_path, check=False)
        assert_clean_failure(result, f"--figure {figure}", words)
        assert not (tmp_path / "logs").exists() and not (tmp_path / "models").exists()
    run("VQ-VAE.py", "--output-folder", "q_lfq_s0", "--num-epochs", "1", "--data-folder",
        data_folder, "--quantizer", "lfq", "--k", "32", *QUANTIZER_RUN, cwd=tmp_path)
    compare = ["compare_quantizers.py", "--variants", "lfq", "--seeds", "0", "--num-epochs", "1",
               "--prior-epochs", "1", "--prior-flags", "--train-subset 128 --hold-out 64 "
               "--test-subset 64 --num-layers 2 --channels 16", "--judge-flags",
               "--num-samples 100 --test-subset 100", "--data-folder", data_folder,
               "--figure", "q.png"]
    result = run(*compare, cwd=tmp_path)
    assert "VQ-VAE.py" not in result.stdout and (tmp_path / "q.png").exists()
    assert "pixelcnn_prior.py" in result.stdout and "sample_quality.py" in result.stdout
    assert json.loads(result.stdout.splitlines()[-1])["lfq"]["seeds"] == 1
    rows = [line for line in result.stdout.splitlines() if line.startswith("| lfq ")]
    assert len(rows) == 2 and rows[0].startswith("| lfq | 1 |"), rows
    assert rows[1].startswith("| lfq (prior, guidance") and rows[1].count("%") == 5, rows
    again = run(*compare[:-2], cwd=tmp_path)  # the default --figure: here, not README's figure
    assert "pixelcnn_prior.py" not in again.stdout and "sample_quality.py" not in again.stdout
    assert (tmp_path / "quantizers.png").read_bytes()[:4] == b"\x89PNG"
    assert again.stdout.count("| lfq ") == 2
    # A report judged before the floor was random draws is refused, not mixed with new ones
    report = tmp_path / "models" / "prior_lfq_s0" / "sample_quality.json"
    fresh = json.loads(report.read_text())
    report.write_text(json.dumps({k: v for k, v in fresh.items() if k != "floor_draws"}))
    assert_clean_failure(run(*compare, "--report-only", cwd=tmp_path, check=False),
                         "sample_quality.json", "before its floor")
    report.write_text(json.dumps(fresh))
    # A prior found under the name but trained over another VQ-VAE is refused, not judged
    prior_path = tmp_path / "models" / "prior_lfq_s0" / "last.pt"
    prior = torch.load(prior_path, weights_only=True)
    prior["run_config"]["vqvae_model"] = "models/q_vq_s0/last.pt"
    torch.save(prior, prior_path)
    assert_clean_failure(run(*compare, cwd=tmp_path, check=False), "is a prior over",
                         "models/q_vq_s0/last.pt")
    # A finished run that lost an epoch's checkpoint (its training time) is named, not a traceback
    (tmp_path / "models" / "q_lfq_s0" / "model_1.pt").unlink()
    assert_clean_failure(run("compare_quantizers.py", "--variants", "lfq", "--seeds", "0",
                             "--num-epochs", "1", "--report-only", cwd=tmp_path, check=False),
                         "models/q_lfq_s0/model_1.pt", "no such file")


def test_compare_quantizers_stops_with_the_run_it_started(tmp_path, data_folder):
    """SIGTERM to compare_quantizers.py reaches the VQ-VAE.py it is running: the trainer saves
    last.pt and both exit (the trainer used to go on alone, holding its run folder)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from conftest import REPO
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "compare_quantizers.py"), "--variants", "lfq",
         "--seeds", "0", "--num-epochs", "1", "--data-folder", data_folder],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def trainer():   # the child process, once it catches SIGTERM (its TrainingRun has begun)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/status") as f:
                    caught = next(int(line.split()[1], 16) for line in f
                                  if line.startswith("SigCgt:"))
            except (OSError, StopIteration):
                continue
            if parent == process.pid and caught >> (signal.SIGTERM - 1) & 1:
                return int(pid)
    deadline = time.time() + 120
    while (child := trainer()) is None and time.time() < deadline:
        time.sleep(0.1)
    assert child is not None, process.communicate(timeout=60)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by signal 15" in stderr and "rerun the same command" in stderr
    assert not os.path.exists(f"/proc/{child}")
    assert (tmp_path / "models" / "q_lfq_s0" / "last.pt").is_file()
