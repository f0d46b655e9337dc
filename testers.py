"""Tests: `python -m pytest testers.py`. They train on small real MNIST subsets, on the CPU."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import load_checkpoint, load_prior, save_checkpoint
from data import MNISTSplit
from modules import VectorQuantizedVAE, vqvae_from_config
from training import vqvae_losses
from vector_quantizer import VQEmbedding, kmeans, rotate_to_codes, vq, vq_st

REPO = os.path.dirname(os.path.abspath(__file__))
SEED_CONFIGURATION = ["--codebook", "loss", "--codebook-init", "uniform", "--dead-code-threshold",
                      "0", "--lr-schedule", "constant", "--conv-init-scale", "1",
                      "--latent-init-scale", "1"]
# The shared tiny run (`trained_run`) and the runs compared with it use a constant rate: a cosine
# schedule spans the epochs a run was started with, so only a constant-rate run can be resumed for
# more epochs (test_resume_after_an_epoch_is_bit_identical); the signal tests resume the default
# cosine schedule mid-run.
CONSTANT_LR = ["--lr-schedule", "constant"]
TINY = ["--hidden-size", "16", "--k", "32", "--batch-size", "64", "--train-subset", "1024",
        "--test-subset", "256", "--num-workers", "0", "--seed", "3"]


def run(script, *args, cwd, check=True, in_process=False):
    """Run one of the repo's scripts in `cwd`; returns (returncode, stdout, stderr).
    `in_process` calls the script's entry point in this interpreter (no 3 s start-up): for checks
    that end before any training, where the exit status and the printed lines are what matter."""
    if in_process:
        return run_in_process(script, [str(a) for a in args], cwd)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


_scripts = {}


def run_in_process(script, args, cwd):
    import contextlib
    import importlib.util
    import io
    import types
    if script not in _scripts:
        spec = importlib.util.spec_from_file_location(script[:-3].replace("-", "_"),
                                                      os.path.join(REPO, script))
        _scripts[script] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_scripts[script])
    module, here, argv = _scripts[script], os.getcwd(), sys.argv
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    try:
        os.chdir(cwd)
        sys.argv = [script, *args]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            module.main(*module.parse_args()) if hasattr(module, "parse_args") else module.main()
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(here)
        sys.argv = argv
    return types.SimpleNamespace(returncode=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


@pytest.fixture(scope="session")
def data_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    from data import prepare_mnist
    prepare_mnist(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_folder):
    """One tiny end-to-end VQ-VAE.py run (2 epochs), shared by the tests that read its outputs."""
    cwd = tmp_path_factory.mktemp("run")
    result = run("VQ-VAE.py", "--output-folder", "tiny", "--data-folder", data_folder,
                 "--num-epochs", "2", *TINY, *CONSTANT_LR, cwd=cwd)
    return cwd, result


# ------------------------------------------------------------------ the seed's quantizer tests
def test_vq_shape():
    inputs = torch.rand((2, 3, 5, 7), dtype=torch.float32, requires_grad=True)
    codebook = torch.rand((11, 7), dtype=torch.float32, requires_grad=True)
    indices = vq(inputs, codebook)
    assert indices.size() == (2, 3, 5)
    assert not indices.requires_grad
    assert indices.dtype == torch.int64


def test_vq():
    inputs = torch.rand((2, 3, 5, 7), dtype=torch.float32, requires_grad=True)
    codebook = torch.rand((11, 7), dtype=torch.float32, requires_grad=True)
    indices = vq(inputs, codebook)
    distances = torch.norm(inputs.unsqueeze(3) - codebook, p=2, dim=4)
    assert np.array_equal(indices.numpy(), distances.argmin(dim=3).numpy())


def test_vq_st_shape():
    inputs = torch.rand((2, 3, 5, 7), dtype=torch.float32, requires_grad=True)
    codebook = torch.rand((11, 7), dtype=torch.float32, requires_grad=True)
    codes, indices = vq_st(inputs, codebook)
    assert codes.size() == (2, 3, 5, 7)
    assert codes.requires_grad
    assert codes.dtype == torch.float32
    assert indices.size() == (2 * 3 * 5,)
    assert not indices.requires_grad
    assert indices.dtype == torch.int64


def test_vq_st_gradient1():
    inputs = torch.rand((2, 3, 5, 7), dtype=torch.float32, requires_grad=True)
    codebook = torch.rand((11, 7), dtype=torch.float32, requires_grad=True)
    codes, _ = vq_st(inputs, codebook)
    grad_output = torch.rand((2, 3, 5, 7))
    grad_inputs, = torch.autograd.grad(codes, inputs, grad_outputs=[grad_output])
    # Straight-through estimator
    assert grad_inputs.size() == (2, 3, 5, 7)
    assert np.allclose(grad_output.numpy(), grad_inputs.numpy())


def test_vq_st_gradient2():
    inputs = torch.rand((2, 3, 5, 7), dtype=torch.float32, requires_grad=True)
    codebook = torch.rand((11, 7), dtype=torch.float32, requires_grad=True)
    codes, _ = vq_st(inputs, codebook)
    indices = vq(inputs, codebook)
    codes_torch = torch.embedding(codebook, indices, padding_idx=-1, scale_grad_by_freq=False,
                                  sparse=False)
    grad_output = torch.rand((2, 3, 5, 7), dtype=torch.float32)
    grad_codebook, = torch.autograd.grad(codes, codebook, grad_outputs=[grad_output])
    grad_codebook_torch, = torch.autograd.grad(codes_torch, codebook, grad_outputs=[grad_output])
    # Gradient is the same as torch.embedding function
    assert grad_codebook.size() == (11, 7)
    assert np.allclose(grad_codebook.numpy(), grad_codebook_torch.numpy())


def test_vq_stays_float32_under_bf16_autocast():
    """A near-tie that bf16 distances get wrong (||e||^2 + ||x||^2 - 2 x.e cancels to bf16's
    resolution, and code 0 would win): under --amp's autocast the lookup and the EMA codebook
    statistics stay float32."""
    inputs = torch.ones(4, 8)
    codebook = torch.ones(2, 8)
    codebook[0, 0] += 0.03  # farther
    codebook[1, 0] += 0.01  # nearest
    quantizer = VQEmbedding(2, 8, codebook="ema", decay=0.5)
    quantizer.embedding.weight.data.copy_(codebook)
    with torch.autocast("cpu", torch.bfloat16):
        assert vq(inputs, codebook).tolist() == [1, 1, 1, 1]
        _, _, indices = quantizer.quantize(inputs.view(4, 8, 1, 1))
    assert indices.flatten().tolist() == [1, 1, 1, 1]
    assert quantizer.cluster_size.dtype == quantizer.embed_avg.dtype == torch.float32


# ------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("codebook", ["loss", "ema"])
def test_model_shapes(codebook):
    model = VectorQuantizedVAE(1, 16, 32, codebook=codebook)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    x_tilde, z_e_x, z_q_x = model(x)
    assert x_tilde.shape == (4, 1, 28, 28) and x_tilde.abs().max() <= 1
    assert z_e_x.shape == z_q_x.shape == (4, 16, 7, 7)
    model.eval()
    latents = model.encode(x)
    assert latents.shape == (4, 7, 7) and latents.dtype == torch.int64
    assert model.decode(latents).shape == (4, 1, 28, 28)
    # decoding the codes reproduces the eval-mode forward pass
    assert torch.allclose(model.decode(latents), model(x)[0], atol=1e-6)


def test_init_scales_keep_the_function_and_scale_the_latent():
    torch.manual_seed(0)
    seed_init = VectorQuantizedVAE(1, 16, 32)
    torch.manual_seed(0)
    scaled = VectorQuantizedVAE(1, 16, 32, conv_init_scale=0.3, latent_init_scale=0.5)
    ratios = {name: (p / w).nanmean().item() for (name, p), w in
              zip(scaled.named_parameters(), seed_init.parameters()) if not torch.equal(p, w)}
    before_batchnorm = ["encoder.0.weight", "decoder.3.weight"] + [
        f"{part}.{i}.block.{j}.weight" for part, blocks in (("encoder", (4, 5)), ("decoder", (0, 1)))
        for i in blocks for j in (1, 4)]
    latent = ["encoder.3.weight", "encoder.4.block.5.weight", "encoder.5.block.5.weight"]
    assert sorted(ratios) == sorted(before_batchnorm + latent)
    for name, ratio in ratios.items():
        # encoder.3 feeds BatchNorm too (inside the residual blocks) but carries the latent scale
        assert ratio == pytest.approx(0.5 if name in latent else 0.3, rel=1e-5), name
    # In training mode (batch statistics) the scaled network is the seed's, with z_e(x) halved.
    # BatchNorm's eps would weigh more against the smaller activations: take it out.
    for module in [*seed_init.modules(), *scaled.modules()]:
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = 1e-12
    x = torch.rand(32, 1, 28, 28) * 2 - 1
    z_e_x = seed_init.encoder(x)
    assert torch.allclose(scaled.encoder(x), 0.5 * z_e_x, rtol=1e-4, atol=1e-5)
    assert torch.allclose(scaled.decoder(z_e_x), seed_init.decoder(z_e_x), rtol=1e-4, atol=1e-5)
    # In eval mode too: BatchNorm's running variance starts scaled by conv_init_scale^2.
    seed_init.eval(), scaled.eval()
    assert torch.allclose(scaled.decoder(z_e_x), seed_init.decoder(z_e_x), rtol=1e-4, atol=1e-5)


def test_both_pipelines_give_identical_batches(data_folder):
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    fast = MNISTSplit(data_folder, True, "cpu", "device", limit=300)
    seed_style = MNISTSplit(data_folder, True, "cpu", "torchvision", num_workers=0, limit=300)
    for (a, la), (b, lb) in zip(fast.batches(128, order), seed_style.batches(128, order)):
        assert torch.equal(a, b) and torch.equal(la, lb)
    images, _ = next(fast.batches(300))
    assert images.min() == -1 and images.max() == 1
    assert abs((images.mean().item() + 1) / 2 - 0.1307) < 0.02  # MNIST's known pixel mean


def test_short_training_run_lowers_loss(data_folder):
    torch.manual_seed(0)
    split = MNISTSplit(data_folder, True, "cpu", limit=2048)
    model = VectorQuantizedVAE(1, 16, 32, codebook="loss")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        for images, _ in split.batches(128, torch.randperm(len(split))):
            loss, reconstruction_loss = vqvae_losses(model, images, 1.0)[:2]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append([loss.item(), reconstruction_loss.item()])
    first, last = np.mean(losses[:5], axis=0), np.mean(losses[-5:], axis=0)
    assert (last < 0.9 * first).all() and last[1] < 0.6 * first[1], (first, last)


def test_checkpoint_round_trip(tmp_path):
    config = {"hidden_size": 8, "k": 16, "codebook": "ema", "codebook_init": "kmeans",
              "ema_decay": 0.9, "dead_code_threshold": 0.5}
    model = vqvae_from_config(config)
    model(torch.rand(8, 1, 28, 28))  # k-means init + an EMA step change the buffers
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, {"kind": "vqvae", "state_dict": model.state_dict(), "config": config})
    assert os.listdir(tmp_path) == ["m.pt"]  # no temp file left behind
    loaded = load_checkpoint(path, "vqvae")
    clone = vqvae_from_config(loaded["config"])
    clone.load_state_dict(loaded["state_dict"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, clone.state_dict()[key]), key
    assert not clone.codeBook._needs_init
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model.eval()(x)[0], clone.eval()(x)[0])


# ---------------------------------------------------------------------------- scripts end to end
def test_training_script_writes_logs_and_checkpoints(trained_run):
    cwd, result = trained_run
    files = sorted(os.listdir(cwd / "models" / "tiny"))
    assert files == ["best.pt", "last.pt", "model_1.pt", "model_2.pt"]
    assert "epoch 2/2" in result.stdout and "perplexity" in result.stdout
    checkpoint = torch.load(cwd / "models" / "tiny" / "last.pt", weights_only=True)
    assert checkpoint["config"]["k"] == 32 and checkpoint["epoch"] == 2
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


@pytest.mark.parametrize("source", ["MNIST", "random"])
def test_generate_writes_a_grid(trained_run, data_folder, source):
    cwd, _ = trained_run
    run("generate.py", "--model", "models/tiny/best.pt", "--input", source, "--filename", source,
        "--data-folder", data_folder, cwd=cwd)
    image = np.asarray(Image.open(cwd / "generatedImages" / f"{source}.png").convert("L"))
    assert image.shape == (302, 302)
    assert image.std() > 10  # not blank


PRETRAINED_VQVAE = os.path.join(REPO, "models", "pretrained", "vqvae_mnist.pt")


def original_repo_checkpoint(path):
    """A checkpoint as the original repo writes it: its model (this repo's network with the seed's
    bare nn.Embedding codebook, so exactly the original's keys), `torch.save(model.state_dict(), f)`.
    The weights are the committed VQ-VAE's, so its reconstructions are real ones."""
    trained = torch.load(PRETRAINED_VQVAE, weights_only=True)
    model = VectorQuantizedVAE(1, 40, 512)
    model.codeBook = torch.nn.Module()
    model.codeBook.embedding = torch.nn.Embedding(512, 40)
    model.load_state_dict({k: v for k, v in trained["state_dict"].items()
                           if not k.startswith("codeBook.") or k == "codeBook.embedding.weight"})
    torch.save(model.state_dict(), path)


def test_original_repo_checkpoint_draws_and_evaluates(data_folder, tmp_path):
    original_repo_checkpoint(tmp_path / "best.pt")
    assert not any(k.startswith("codeBook.") and k != "codeBook.embedding.weight"
                   for k in torch.load(tmp_path / "best.pt", weights_only=True))
    run("generate.py", "--model", "best.pt", "--input", "MNIST", "--filename", "seed",
        "--data-folder", data_folder, cwd=tmp_path, in_process=True)
    grid = np.asarray(Image.open(tmp_path / "generatedImages" / "seed.png").convert("L")) / 255.0
    from torchvision.utils import make_grid
    images, _ = next(MNISTSplit(data_folder, False, "cpu", limit=100).batches(100))
    real = make_grid(images, nrow=10, normalize=True, value_range=(-1, 1))[0].numpy()
    assert grid.std() > 0.1  # not blank, and far closer to the input than its mean image is
    assert ((grid - real) ** 2).mean() < 0.1 * ((real.mean() - real) ** 2).mean()
    import json
    figures = [json.loads(run("evaluate.py", "--model", model, "--data-folder", data_folder,
                              "--test-subset", 500, "--json", cwd=tmp_path, in_process=True).stdout)
               for model in ("best.pt", PRETRAINED_VQVAE)]
    assert figures[0] == figures[1]  # the same weights as the committed checkpoint: same figures
    assert figures[0]["test_mse"] < 0.02


@pytest.mark.parametrize("damage", ["extra", "missing", "other_size"])
def test_original_repo_checkpoint_with_other_keys_is_refused(tmp_path, damage):
    original_repo_checkpoint(tmp_path / "best.pt")
    state_dict = torch.load(tmp_path / "best.pt", weights_only=True)
    key = {"extra": "decoder.99.weight", "missing": "decoder.4.weight",
           "other_size": "encoder.0.weight"}[damage]
    if damage == "extra":
        state_dict[key] = torch.zeros(1)
    elif damage == "missing":
        del state_dict[key]
    else:
        state_dict[key] = torch.zeros(3)
    torch.save(state_dict, tmp_path / "damaged.pt")
    result = run("generate.py", "--model", "damaged.pt", "--hidden-size-vae", 40, "--k", 512,
                 "--input", "random", cwd=tmp_path, check=False, in_process=True)
    assert_clean_failure(result, "damaged.pt", key)
    assert "cluster_size" not in result.stderr  # the filled buffers are never named
    assert not (tmp_path / "generatedImages").exists()


# ------------------------------------------------------------------------------------ bad input
def assert_clean_failure(result, *words):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("args, word", [
    (["--k", "0"], "--k"),
    (["--hidden-size", "-4"], "--hidden-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--num-epochs", "-1"], "--num-epochs"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--beta", "0"], "--beta"),
    (["--beta", "-1"], "--beta"),
    (["--beta", "inf"], "--beta"),
    (["--k", "many"], "--k"),
    (["--num-workers", "-1"], "--num-workers"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--codebook", "magic"], "--codebook"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:7"], "--device"),
    (["--output-folder", "../escape"], "--output-folder"),
])
def test_training_rejects_bad_flags(tmp_path, data_folder, args, word):
    result = run("VQ-VAE.py", "--data-folder", data_folder, *args, cwd=tmp_path, check=False,
                 in_process=True)
    assert_clean_failure(result, word)
    assert not (tmp_path / "models").exists()


def test_training_rejects_data_folder_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = run("VQ-VAE.py", "--data-folder", "afile", cwd=tmp_path, check=False, in_process=True)
    assert_clean_failure(result, "--data-folder")


def test_training_rejects_unwritable_output(tmp_path, data_folder):
    (tmp_path / "models").write_text("a file where the models folder should be")
    result = run("VQ-VAE.py", "--data-folder", data_folder, *TINY, cwd=tmp_path, check=False)
    assert_clean_failure(result, "models")
    assert (tmp_path / "models").read_text().startswith("a file")


@pytest.mark.parametrize("damage", ["truncate", "corrupt_shipped"])
def test_training_rejects_damaged_dataset(tmp_path, data_folder, damage, monkeypatch):
    import shutil
    if damage == "truncate":
        raw = tmp_path / "data" / "MNIST" / "raw"
        shutil.copytree(os.path.join(data_folder, "MNIST", "raw"), raw)
        with open(raw / "t10k-images-idx3-ubyte", "r+b") as f:
            f.truncate(1000)
        result = run("VQ-VAE.py", "--data-folder", "data", *TINY, cwd=tmp_path, check=False)
        assert_clean_failure(result, "t10k-images-idx3-ubyte", "truncated")
        assert os.path.getsize(raw / "t10k-images-idx3-ubyte") == 1000  # left for the user to see
    else:
        import data
        shipped = tmp_path / "shipped"
        shutil.copytree(data.SHIPPED_MNIST, shipped)
        with open(shipped / "train-labels-idx1-ubyte.gz", "r+b") as f:
            f.seek(100)
            f.write(b"garbage")
        monkeypatch.setattr(data, "SHIPPED_MNIST", str(shipped))
        with pytest.raises(SystemExit) as exit_info:
            data.prepare_mnist(str(tmp_path / "fresh"))
        assert exit_info.value.code == 2


def prepare_at_barrier(barrier, folder):
    import data
    barrier.wait()
    data.prepare_mnist(folder)


def test_many_processes_prepare_one_fresh_data_folder_at_once(tmp_path):
    """8 processes released together prepare one fresh --data-folder, three times over: every one
    succeeds, and the folder holds exactly the four files, byte for byte the decompressed shipped
    files that MNIST/SHA256SUMS vouches for (prepare_mnist checks the .gz against it)."""
    import gzip
    import hashlib
    import multiprocessing
    import data
    decompressed = {name: hashlib.sha256(gzip.open(os.path.join(data.SHIPPED_MNIST, name + ".gz"))
                                         .read()).hexdigest() for name in data.MNIST_FILES}
    context = multiprocessing.get_context("fork")  # starts at once: no new interpreter to import
    for attempt in range(3):
        folder = tmp_path / f"data{attempt}"
        barrier = context.Barrier(8)
        processes = [context.Process(target=prepare_at_barrier, args=(barrier, str(folder)))
                     for _ in range(8)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
        assert [process.exitcode for process in processes] == [0] * 8, attempt
        raw = folder / "MNIST" / "raw"
        assert sorted(os.listdir(raw)) == sorted(data.MNIST_FILES), attempt
        for name, digest in decompressed.items():
            assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == digest, name


def test_two_runs_of_one_name_cannot_both_write(tmp_path, monkeypatch, capsys):
    """Two runs started at once under one --output-folder both pass the early check (no
    checkpoint yet); the claim on models/<name> lets the first in and stops the second in one line."""
    from runs import prepare_run_folders
    monkeypatch.chdir(tmp_path)
    _, model_dir, claim = prepare_run_folders("same", None, False)
    with pytest.raises(SystemExit) as exit_info:
        prepare_run_folders("same", None, False)
    assert exit_info.value.code == 2
    assert "another run is writing to models/same/" in capsys.readouterr().err
    claim.release()  # the first run ended: the name is free again
    prepare_run_folders("same", None, False)


@pytest.mark.parametrize("case", ["input", "missing", "not_checkpoint", "other_sizes", "filename",
                                  "empty_filename", "empty_file"])
def test_generate_rejects_bad_input(trained_run, tmp_path, case):
    cwd, _ = trained_run
    model = str(cwd / "models" / "tiny" / "best.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    args, word = {
        "input": (["--model", model, "--input", "dream"], "--input"),
        "missing": (["--model", "nope.pt"], "nope.pt"),
        "not_checkpoint": (["--model", "notes.pt"], "not a PyTorch checkpoint"),
        "empty_file": (["--model", "empty.pt"], "empty.pt"),
        "other_sizes": (["--model", model, "--k", "64"], "--k"),
        "filename": (["--model", model, "--filename", "a/b"], "--filename"),
        "empty_filename": (["--model", model, "--filename", ""], "--filename"),
    }[case]
    result = run("generate.py", *args, cwd=tmp_path, check=False, in_process=True)
    assert_clean_failure(result, word)
    assert not (tmp_path / "generatedImages").exists()


# ------------------------------------------------------------------------------------- codebook
def test_ema_update_matches_hand_computation():
    quantizer = VQEmbedding(2, 1, codebook="ema", decay=0.5, eps=1e-5)
    quantizer.embedding.weight.data = torch.tensor([[0.0], [10.0]])
    quantizer.embed_avg.copy_(quantizer.embedding.weight.data)
    z_e_x = torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 1, 3)               # (B, D, H, W)
    _, _, indices = quantizer.quantize(z_e_x)
    assert indices.flatten().tolist() == [0, 0, 1]
    # counts (2, 1), sums (3, 9); both EMA statistics start at (1, 1) and the codebook.
    cluster_size = 0.5 * torch.tensor([1.0, 1.0]) + 0.5 * torch.tensor([2.0, 1.0])   # (1.5, 1.0)
    embed_avg = 0.5 * torch.tensor([0.0, 10.0]) + 0.5 * torch.tensor([3.0, 9.0])     # (1.5, 9.5)
    n = cluster_size.sum()
    smoothed = (cluster_size + 1e-5) / (n + 2 * 1e-5) * n
    assert torch.allclose(quantizer.cluster_size, cluster_size)
    assert torch.allclose(quantizer.embedding.weight.flatten(), embed_avg / smoothed)
    assert torch.allclose(quantizer.embedding.weight.flatten(), torch.tensor([1.0, 9.5]), atol=1e-4)
    quantizer.eval()
    quantizer.quantize(z_e_x * 100)  # eval mode never moves the codebook
    assert torch.allclose(quantizer.embedding.weight.flatten(), embed_avg / smoothed)


@pytest.mark.parametrize("codebook", ["loss", "ema"])
def test_dead_code_restart_moves_only_dead_codes(codebook):
    torch.manual_seed(0)
    quantizer = VQEmbedding(4, 2, codebook=codebook, decay=0.5, dead_code_threshold=0.6)
    live = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    quantizer.embedding.weight.data = torch.cat([live, torch.tensor([[100.0, 100], [-100, -100]])])
    quantizer.embed_avg.copy_(quantizer.embedding.weight.data)
    z_e_x = torch.tensor([[0.1, 0.0], [0.0, 0.1], [0.9, 1.0], [1.0, 0.9]]).t().reshape(1, 2, 2, 2)
    quantizer.quantize(z_e_x)
    weight = quantizer.embedding.weight.detach()
    outputs = z_e_x.permute(0, 2, 3, 1).reshape(-1, 2)
    for code in (2, 3):  # never used: EMA usage 0.5 < 0.6, re-seeded onto an encoder output
        assert (weight[code] == outputs).all(1).any(), weight[code]
    if codebook == "loss":
        assert torch.equal(weight[:2], live)  # live codes are left alone
    else:
        assert (weight[:2] - live).abs().max() < 0.1  # live codes only took their EMA step
    assert (quantizer.cluster_size >= 0.6).all()


def test_restarted_code_gets_a_grace_period_above_the_threshold():
    # With a threshold above 1 a re-seeded code must not be judged dead again on the next step.
    torch.manual_seed(0)
    quantizer = VQEmbedding(4, 2, codebook="ema", decay=0.9, dead_code_threshold=2.0)
    quantizer.embedding.weight.data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [50.0, 50], [-50, -50]])
    quantizer.embed_avg.copy_(quantizer.embedding.weight.data)
    quantizer.cluster_size.copy_(torch.tensor([10.0, 10.0, 1.0, 1.0]))   # mean usage 5.5
    z_e_x = torch.tensor([[0.1, 0.0], [0.0, 0.1], [0.9, 1.0], [1.0, 0.9]]).t().reshape(1, 2, 2, 2)
    quantizer.quantize(z_e_x)
    mean_usage = (0.9 * 10 + 0.1 * 2) * 2 / 4 + 0.9 * 1 * 2 / 4            # after the EMA step
    assert torch.allclose(quantizer.cluster_size[2:], torch.tensor([mean_usage] * 2))
    outputs = z_e_x.permute(0, 2, 3, 1).reshape(-1, 2)
    reseeded = quantizer.embedding.weight.detach()[2:].clone()
    assert all((code == outputs).all(1).any() for code in reseeded)        # codeword = its seed
    quantizer.quantize(z_e_x * 0 + 3)          # nothing goes to the re-seeded codes this step...
    assert torch.allclose(quantizer.embedding.weight.detach()[2:], reseeded)  # ...and they stay


def test_rotation_trick_forward_is_the_codeword_and_gradient_is_rotated():
    torch.manual_seed(0)
    inputs = torch.randn(6, 5, requires_grad=True)
    codes = torch.randn(6, 5)
    out = rotate_to_codes(inputs, codes)
    assert torch.equal(out, codes)
    grad_out = torch.randn(6, 5)
    out.backward(grad_out)
    for e, q, g, grad in zip(inputs.detach(), codes, grad_out, inputs.grad):
        # The matrix lambda R of the paper, built densely: it maps e onto q, and the gradient is its
        # transpose applied to the incoming gradient.
        e_hat, q_hat = e / e.norm(), q / q.norm()
        r = (e_hat + q_hat) / (e_hat + q_hat).norm()
        rotation = torch.eye(5) - 2 * torch.outer(r, r) + 2 * torch.outer(q_hat, e_hat)
        scale = q.norm() / e.norm()
        assert torch.allclose(scale * rotation @ e, q, atol=1e-5)
        assert torch.allclose(grad, scale * rotation.t() @ g, atol=1e-5)
        assert not torch.allclose(grad, g)  # not the straight-through copy


def test_rotation_gradient_option_trains(data_folder):
    torch.manual_seed(0)
    model = vqvae_from_config({"hidden_size": 16, "k": 32, "codebook": "ema",
                               "gradient": "rotation"})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    split = MNISTSplit(data_folder, True, "cpu", limit=512)
    losses = []
    for _ in range(3):
        for images, _ in split.batches(64):
            loss = vqvae_losses(model, images, 1.0, learned_codebook=False)[1]
            optimizer.zero_grad()
            loss.backward()
            assert model.encoder[0].weight.grad.abs().sum() > 0  # the decoder's gradient got through
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-8:]) < 0.7 * sum(losses[:8])


def test_kmeans_init_beats_uniform(data_folder):
    torch.manual_seed(0)
    model = VectorQuantizedVAE(1, 16, 64)
    images, _ = next(MNISTSplit(data_folder, True, "cpu", limit=256).batches(256))
    with torch.no_grad():
        flat = model.encoder(images).permute(0, 2, 3, 1).reshape(-1, 16)

    def error(codebook):
        return (flat - codebook[vq(flat, codebook)]).pow(2).sum(1).mean().item()
    uniform = model.codeBook.embedding.weight.detach()
    assert error(kmeans(flat, 64)) < 0.5 * error(uniform)
    quantizer = VQEmbedding(64, 16, init="kmeans")
    assert not bool(quantizer.initialized)
    quantizer.quantize(flat.t().reshape(1, 16, -1, 1))
    assert bool(quantizer.initialized)
    assert error(quantizer.embedding.weight.detach()) < 0.5 * error(uniform)


def test_seed_makes_runs_identical(trained_run, tmp_path, data_folder):
    cwd, _ = trained_run
    run("VQ-VAE.py", "--output-folder", "tiny", "--data-folder", data_folder, "--num-epochs", "2",
        *TINY, *CONSTANT_LR, cwd=tmp_path)
    assert_same_weights(cwd / "models" / "tiny" / "last.pt", tmp_path / "models" / "tiny" / "last.pt")


def test_seed_pipeline_trains_bit_identically(trained_run, tmp_path, data_folder):
    """The fast input path changes speed only: the seed's torchvision DataLoader pipeline, same
    seed, ends with exactly the same weights."""
    cwd, _ = trained_run
    run("VQ-VAE.py", "--output-folder", "tiny", "--data-folder", data_folder, "--num-epochs", "2",
        *TINY, *CONSTANT_LR, "--data-pipeline", "torchvision", "--num-workers", "1", cwd=tmp_path)
    assert_same_weights(cwd / "models" / "tiny" / "last.pt", tmp_path / "models" / "tiny" / "last.pt")


def assert_same_weights(path_a, path_b):
    a = torch.load(path_a, weights_only=True)
    b = torch.load(path_b, weights_only=True)
    assert a["step"] == b["step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_seed_configuration_still_trains(tmp_path, data_folder):
    run("VQ-VAE.py", "--output-folder", "seedcfg", "--data-folder", data_folder,
        *SEED_CONFIGURATION, "--num-epochs", "1", *TINY, cwd=tmp_path)
    config = torch.load(tmp_path / "models" / "seedcfg" / "best.pt", weights_only=True)["config"]
    assert (config["codebook"], config["codebook_init"], config["dead_code_threshold"],
            config["lr_schedule"], config["conv_init_scale"], config["latent_init_scale"]) == \
        ("loss", "uniform", 0.0, "constant", 1.0, 1.0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "logs" / "seedcfg")).Reload()
    losses = [e.value for e in events.Scalars("loss/train/reconstruction")]
    assert len(losses) == 16 and np.mean(losses[-4:]) < 0.95 * np.mean(losses[:4])  # it learns


def test_evaluate_prints_all_fields(trained_run, data_folder):
    import json
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


# ---------------------------------------------------------------------------------- reliability
def test_resume_after_an_epoch_is_bit_identical(trained_run, tmp_path, data_folder):
    cwd, _ = trained_run
    run("VQ-VAE.py", "--output-folder", "tiny", "--data-folder", data_folder, "--num-epochs", "1",
        *TINY, *CONSTANT_LR, cwd=tmp_path)
    run("VQ-VAE.py", "--resume", "models/tiny/last.pt", "--num-epochs", "2",
        "--data-folder", data_folder, cwd=tmp_path)
    assert_same_weights(cwd / "models" / "tiny" / "last.pt", tmp_path / "models" / "tiny" / "last.pt")
    assert sorted(os.listdir(tmp_path / "models" / "tiny")) == \
        ["best.pt", "last.pt", "model_1.pt", "model_2.pt"]


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory, data_folder):
    """A 2-epoch run of 128 steps: the reference for interrupted-and-resumed runs."""
    cwd = tmp_path_factory.mktemp("whole")
    run("VQ-VAE.py", "--output-folder", "whole", *signal_run_flags(data_folder), cwd=cwd)
    return cwd / "models" / "whole" / "last.pt"


def signal_run_flags(data_folder):
    return ["--data-folder", data_folder, "--num-epochs", "2", *TINY, "--train-subset", "4096"]


@pytest.mark.parametrize("signum", [2, 15])  # SIGINT (Ctrl-C), SIGTERM
def test_signal_saves_last_and_resume_is_bit_identical(uninterrupted_run, tmp_path, data_folder,
                                                       signum):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "VQ-VAE.py"), "--output-folder",
                                "cut", *signal_run_flags(data_folder)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().startswith("training")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert "--resume models/cut/last.pt" in stderr
    cut = torch.load(tmp_path / "models" / "cut" / "last.pt", weights_only=True)
    assert 0 < cut["step"] < 128  # stopped mid-run, after finishing a step
    run("VQ-VAE.py", "--resume", "models/cut/last.pt", "--data-folder", data_folder, cwd=tmp_path)
    assert_same_weights(uninterrupted_run, tmp_path / "models" / "cut" / "last.pt")


def test_resume_cannot_stretch_a_cosine_schedule(uninterrupted_run, tmp_path):
    result = run("VQ-VAE.py", "--resume", uninterrupted_run, "--num-epochs", "3", cwd=tmp_path,
                 check=False, in_process=True)
    assert_clean_failure(result, "--num-epochs 3", "cosine")
    assert not (tmp_path / "models").exists()


def test_nan_loss_stops_training_and_keeps_checkpoints(trained_run, data_folder, tmp_path):
    cwd, _ = trained_run
    result = run("VQ-VAE.py", "--resume", "models/tiny/last.pt", "--num-epochs", "3",
                 "--data-folder", data_folder, "--log-every", "4", "--lr", "1e30", cwd=cwd,
                 check=False, in_process=True)
    assert result.returncode == 2 and "--lr" in result.stderr  # a resume cannot change the lr
    result = run("VQ-VAE.py", "--output-folder", "nan", "--data-folder", data_folder,
                 "--lr", "1e30", "--log-every", "4", "--num-epochs", "1", *TINY, cwd=tmp_path,
                 check=False)
    assert result.returncode == 1
    assert "loss became nan at step" in result.stderr and "Traceback" not in result.stderr
    assert not os.listdir(tmp_path / "models" / "nan")
    # A run whose weights turn non-finite after it wrote checkpoints: they stay as they were.
    import shutil
    shutil.copytree(cwd / "models" / "tiny", tmp_path / "models" / "poisoned")
    checkpoint = torch.load(tmp_path / "models" / "poisoned" / "last.pt", weights_only=True)
    checkpoint["state_dict"]["decoder.6.weight"].fill_(float("inf"))
    torch.save(checkpoint, tmp_path / "models" / "poisoned" / "last.pt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "models" / "poisoned").iterdir()}
    result = run("VQ-VAE.py", "--resume", "models/poisoned/last.pt", "--num-epochs", "3",
                 "--data-folder", data_folder, cwd=tmp_path, check=False)
    assert result.returncode == 1 and "loss became nan at step 33" in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "models" / "poisoned").iterdir()} == before


def test_existing_run_is_not_overwritten(trained_run, data_folder):
    cwd, _ = trained_run
    before = (cwd / "models" / "tiny" / "best.pt").read_bytes()
    result = run("VQ-VAE.py", "--output-folder", "tiny", "--data-folder", data_folder, *TINY,
                 cwd=cwd, check=False, in_process=True)
    assert_clean_failure(result, "--overwrite", "--resume")
    assert (cwd / "models" / "tiny" / "best.pt").read_bytes() == before


def test_resume_counts_every_typed_flag(trained_run, data_folder, tmp_path):
    """--num-epochs 10 is the default, but typed it counts: the finished 2-epoch constant-rate run
    continues (to --max-steps 40); a typed --k 512 that contradicts the run's K 32 is refused."""
    import shutil
    cwd, _ = trained_run
    shutil.copytree(cwd / "models" / "tiny", tmp_path / "models" / "tiny")
    result = run("VQ-VAE.py", "--resume", "models/tiny/last.pt", "--k", "512",
                 "--data-folder", data_folder, cwd=tmp_path, check=False, in_process=True)
    assert_clean_failure(result, "--k 512", "32")
    run("VQ-VAE.py", "--resume", "models/tiny/last.pt", "--num-epochs", "10", "--max-steps", "40",
        "--data-folder", data_folder, cwd=tmp_path)
    assert torch.load(tmp_path / "models" / "tiny" / "last.pt", weights_only=True)["step"] == 40


def test_resume_rejects_conflicting_config(trained_run, data_folder):
    cwd, _ = trained_run
    result = run("VQ-VAE.py", "--resume", "models/tiny/last.pt", "--k", "64",
                 "--data-folder", data_folder, cwd=cwd, check=False, in_process=True)
    assert_clean_failure(result, "--k 64", "32")


class CodeRunningPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "config": CodeRunningPayload(marker)}, tmp_path / "evil.pt")
    result = run("generate.py", "--model", "evil.pt", cwd=tmp_path, check=False)
    assert_clean_failure(result, "evil.pt", "weights_only")
    assert not marker.exists()


def test_checkpoint_of_another_script_is_refused_by_name(tmp_path):
    save_checkpoint(str(tmp_path / "prior.pt"), {"kind": "prior", "state_dict": {}, "config": {}})
    result = run("generate.py", "--model", "prior.pt", cwd=tmp_path, check=False, in_process=True)
    assert_clean_failure(result, "prior checkpoint", "pixelcnn_prior.py")


@pytest.mark.parametrize("size", [0, 100])
def test_empty_or_truncated_checkpoint_is_refused(trained_run, tmp_path, size):
    cwd, _ = trained_run
    data = (cwd / "models" / "tiny" / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:size])
    result = run("evaluate.py", "--model", "cut.pt", cwd=tmp_path, check=False, in_process=True)
    assert_clean_failure(result, "cut.pt")


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import errno
    path = str(tmp_path / "last.pt")
    save_checkpoint(path, {"kind": "vqvae", "state_dict": {"w": torch.ones(3)}, "config": {}})

    def full_disk_save(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"kind": "vqvae", "state_dict": {"w": torch.zeros(3)}, "config": {}})
    assert os.listdir(tmp_path) == ["last.pt"]
    assert torch.equal(load_checkpoint(path, "vqvae")["state_dict"]["w"], torch.ones(3))


def test_tensorboard_server_serves_the_logs(trained_run):
    import json
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


# ---------------------------------------------------------------------------------------- prior
def assert_causal_without_blind_spot(prior, K, blind_spot_check=True):
    """The logits at (i, j) depend on no code from (i, j) on in raster order, and (unless saturated
    weights zero some gradients) on every code before it."""
    x = prior.embedding(torch.randint(K, (1, 7, 7))).permute(0, 3, 1, 2).detach().requires_grad_()
    logits = prior.output(prior.stacks_embedded(x, torch.tensor([3])))   # (1, K, 7, 7)
    raster = torch.arange(49).view(7, 7)
    for i in range(7):
        for j in range(7):
            grad, = torch.autograd.grad(logits[0, :, i, j].sum(), x, retain_graph=True)
            influences = grad[0].abs().sum(0) > 0                         # (7, 7)
            assert not influences[raster >= 7 * i + j].any(), (i, j)
            assert not blind_spot_check or influences[raster < 7 * i + j].all(), (i, j)


def test_prior_is_causal_without_blind_spot():
    from gated_pixelcnn import GatedPixelCNN
    torch.manual_seed(0)
    assert_causal_without_blind_spot(GatedPixelCNN(K=16, dim=8, num_layers=6), 16)


def test_prior_stays_causal_after_copy_training_and_device_moves():
    """Causal by construction: a deep copy (as an EMA of the weights makes) trained with Adam, and
    a move to another device type and back with every weight drawn anew, still see no future code."""
    import copy
    from gated_pixelcnn import GatedPixelCNN
    torch.manual_seed(0)
    prior = copy.deepcopy(GatedPixelCNN(K=16, dim=8, num_layers=3))
    optimizer = torch.optim.Adam(prior.parameters(), lr=0.1)
    codes = torch.randint(16, (4, 7, 7))
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(prior(codes, torch.zeros(4, dtype=torch.long)), codes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert_causal_without_blind_spot(prior, 16, blind_spot_check=False)
    moved = prior.to("meta")
    assert moved(codes.to("meta"), torch.zeros(4, dtype=torch.long, device="meta")).shape == (4, 16, 7, 7)
    moved = moved.to_empty(device="cpu")
    for parameter in moved.parameters():
        torch.nn.init.normal_(parameter)
    assert_causal_without_blind_spot(moved, 16, blind_spot_check=False)


@pytest.mark.parametrize("arch", ["gated_pixelcnn", "transformer"])
def test_prior_conditioning_and_sampling(arch):
    from modules import prior_from_config
    torch.manual_seed(0)
    prior = prior_from_config({"arch": arch, "k": 16, "hidden_size": 8, "num_layers": 4, "heads": 2,
                               "dropout": 0.1, "label_dropout": 0.1}).eval()
    for parameter in prior.parameters():   # weights far from init, so that any cache slip shows
        torch.nn.init.normal_(parameter, std=0.5)
    codes = torch.randint(16, (2, 7, 7))
    with torch.no_grad():
        assert not torch.allclose(prior(codes, torch.tensor([0, 0])), prior(codes, torch.tensor([0, 7])))
        labels = torch.tensor([0, 3, 7, 9, 10])          # 10: the null label, no digit
        # the cached sampler's logits at every position are the full forward pass's
        sampled, logits = prior.sample(labels, return_logits=True)
        torch.testing.assert_close(logits, prior(sampled, labels), atol=1e-4, rtol=1e-4)
        # guided: u + s (c - u), the unconditional half run in the same batch
        labels = labels[:4]
        sampled, logits = prior.sample(labels, guidance_scale=2.5, return_logits=True)
        u, c = prior(sampled, torch.full_like(labels, 10)), prior(sampled, labels)
        torch.testing.assert_close(logits, u + 2.5 * (c - u), atol=1e-4, rtol=1e-4)
        greedy = prior.sample(labels, temperature=1e-6)
        assert torch.equal(prior(greedy, labels).argmax(1), greedy)
    with pytest.raises(ValueError, match="label dropout"):
        prior_from_config({"arch": arch, "k": 16, "hidden_size": 8, "num_layers": 2, "heads": 2,
                           "dropout": 0.0}).sample(labels, guidance_scale=2.0)


def test_transformer_prior_is_causal():
    """Changing code t changes the transformer's logits at positions after t only."""
    from code_transformer import CodeTransformer
    torch.manual_seed(0)
    prior = CodeTransformer(K=16, dim=8, num_layers=2, heads=2).eval()
    codes, labels = torch.randint(16, (2, 7, 7)), torch.tensor([1, 5])
    for t in (0, 20, 48):
        changed = codes.clone().flatten(1)
        changed[:, t] = (changed[:, t] + 1) % 16
        with torch.no_grad():
            moved = (prior(changed.view(2, 7, 7), labels) - prior(codes, labels)).abs().amax((0, 1))
        assert torch.equal(moved.flatten() > 1e-6, torch.arange(49) > t), t


def test_transformer_prior_trains_and_samples(trained_run, data_folder):
    cwd, _ = trained_run
    run("pixelcnn_prior.py", "--vqvae-model", "models/tiny/best.pt", "--data-folder", data_folder,
        "--train-subset", "512", "--test-subset", "128", "--num-epochs", "1", "--arch",
        "transformer", "--num-layers", "2", "--hidden-size", "16", "--heads", "2",
        "--output-folder", "prior_transformer", cwd=cwd)
    prior = load_prior(str(cwd / "models/prior_transformer/best.pt"), "cpu", 32)
    assert type(prior).__name__ == "CodeTransformer" and prior.null_label == 10
    run("generate.py", "--model", "models/tiny/best.pt", "--input", "prior", "--prior-model",
        "models/prior_transformer/best.pt", "--guidance-scale", "2", "--filename", "transformer",
        cwd=cwd, in_process=True)
    assert (cwd / "generatedImages" / "transformer.png").exists()


def test_sampler_draws_from_the_filtered_distribution():
    from sampling import draw, filter_logits
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().expand(200000, 5)
    frequencies = torch.bincount(draw(logits), minlength=5) / 200000
    torch.testing.assert_close(frequencies, probs, atol=5e-3, rtol=0)
    assert frequencies[4] == 0                        # a code of probability 0 is never drawn
    kept = lambda **kw: torch.isfinite(filter_logits(probs.log()[None], **kw)[0]).tolist()
    assert kept(top_k=2) == [True, True, False, False, False]
    # nucleus: the smallest set holding the mass; 0.5 + 0.3 reaches 0.8, so nothing after
    assert kept(top_p=0.8) == [True, True, False, False, False]
    assert kept(top_p=0.81) == [True, True, True, False, False]
    assert kept(top_p=0.3) == [True, False, False, False, False]
    assert kept(top_k=3, top_p=1.0) == [True, True, True, False, False]


def test_prior_ema_follows_the_weights():
    from gated_pixelcnn import GatedPixelCNN
    from pixelcnn_prior import update_ema
    prior, average = GatedPixelCNN(K=8, dim=4, num_layers=2), GatedPixelCNN(K=8, dim=4, num_layers=2)
    before = [p.clone() for p in average.parameters()]
    update_ema(average, prior, 0.999, step=0)         # step 0: decay ramps to 0.1
    for p, b, w in zip(average.parameters(), before, prior.parameters()):
        torch.testing.assert_close(p, b + 0.9 * (w - b))
    for step in range(1, 3000):
        update_ema(average, prior, 0.999, step)
    for p, w in zip(average.parameters(), prior.parameters()):
        torch.testing.assert_close(p, w, atol=1e-3, rtol=0)


@pytest.fixture(scope="session")
def trained_prior(trained_run, data_folder):
    cwd, _ = trained_run
    result = run("pixelcnn_prior.py", "--vqvae-model", "models/tiny/best.pt", "--data-folder",
                 data_folder, "--train-subset", "2048", "--test-subset", "256", "--num-epochs", "2",
                 "--num-layers", "4", "--hidden-size", "32", "--output-folder", "prior",
                 "--lr-schedule", "constant", cwd=cwd)
    return cwd, result


def test_prior_training_lowers_nll(trained_prior):
    cwd, result = trained_prior
    checkpoint = load_checkpoint(str(cwd / "models" / "prior" / "last.pt"), "prior")
    assert checkpoint["config"]["k"] == 32 and checkpoint["epoch"] == 2
    bits = [float(line.split("=")[1].split()[0]) for line in result.stdout.splitlines()
            if line.startswith("epoch")]
    assert len(bits) == 2 and bits[1] < bits[0] < 49 * 5  # under the uniform bound 49 log2 32
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(cwd / "logs" / "prior")).Reload()
    assert {"loss/test/nll_nats_per_map", "loss/test/bits_per_code",
            "loss/test/bits_per_code_without_ema"} <= set(events.Tags()["scalars"])
    # by default the checkpoint samples with the weights' moving average, keeps the weights to
    # resume, and the prior learned the null label (label dropout) that guidance needs
    average, weights = checkpoint["state_dict"], checkpoint["training_state_dict"]
    assert average.keys() == weights.keys()
    assert not torch.equal(average["embedding.weight"], weights["embedding.weight"])
    prior = load_prior(str(cwd / "models" / "prior" / "best.pt"), "cpu", 32)
    assert prior.null_label == 10
    torch.testing.assert_close(prior.state_dict()["class_embedding.weight"],
                               load_checkpoint(str(cwd / "models" / "prior" / "best.pt"), "prior")
                               ["state_dict"]["class_embedding.weight"])


def test_prior_resume_is_bit_identical(trained_prior, tmp_path, data_folder):
    """A 1-epoch run resumed to 2 epochs equals the 2-epoch run (at a constant learning rate: a
    cosine schedule spans the epochs the run was started with)."""
    cwd, _ = trained_prior
    vqvae = str(cwd / "models" / "tiny" / "best.pt")
    args = ["--vqvae-model", vqvae, "--data-folder", data_folder, "--train-subset", "2048",
            "--test-subset", "256", "--num-layers", "4", "--hidden-size", "32", "--output-folder",
            "prior", "--lr-schedule", "constant"]
    run("pixelcnn_prior.py", *args, "--num-epochs", "1", cwd=tmp_path)
    run("pixelcnn_prior.py", "--resume", "models/prior/last.pt", "--num-epochs", "2",
        "--vqvae-model", vqvae, "--data-folder", data_folder, cwd=tmp_path)
    assert_same_weights(cwd / "models" / "prior" / "last.pt", tmp_path / "models" / "prior" / "last.pt")


def test_prior_run_from_before_the_new_flags_resumes_without_them(trained_prior, tmp_path):
    """A last.pt written before --dropout/--label-dropout/--ema-decay/--arch existed resumes as
    the run it was: a Gated PixelCNN with ten class rows, no dropout, no average."""
    import pixelcnn_prior
    from checkpoints import load_state
    from modules import prior_from_config
    cwd, _ = trained_prior
    checkpoint = torch.load(cwd / "models" / "prior" / "last.pt", weights_only=True)
    for key in pixelcnn_prior.BEFORE_FLAGS:
        del checkpoint["config"][key]
    state_dict = checkpoint.pop("training_state_dict")
    state_dict["class_embedding.weight"] = state_dict["class_embedding.weight"][:10]
    checkpoint["state_dict"] = state_dict
    save_checkpoint(str(tmp_path / "old.pt"), checkpoint)
    args, resumed = pixelcnn_prior.parse_args(["--resume", str(tmp_path / "old.pt")])
    assert (args.arch, args.dropout, args.label_dropout, args.ema_decay) == \
        ("gated_pixelcnn", 0.0, 0.0, 0.0)
    load_state(prior_from_config({**vars(args), "k": 32}), resumed["state_dict"], "--resume", "old.pt")


def test_generate_from_prior(trained_prior):
    cwd, _ = trained_prior
    run("generate.py", "--model", "models/tiny/best.pt", "--input", "prior", "--prior-model",
        "models/prior/best.pt", "--filename", "prior", "--temperature", "0.8",
        "--guidance-scale", "2", "--top-k", "8", "--top-p", "0.9",
        "--num-samples", "30", "--samples-out", "samples.pt", cwd=cwd)
    image = np.asarray(Image.open(cwd / "generatedImages" / "prior.png").convert("L"))
    assert image.shape == (302, 302) and image.std() > 10
    samples = torch.load(cwd / "samples.pt", weights_only=True)
    assert samples.shape == (30, 1, 28, 28) and samples.dtype == torch.uint8


def test_generate_digit_draws_that_digit(tmp_path, data_folder):
    """--digit 3 with the committed models: the committed judge reads the samples as 3s."""
    from checkpoints import load_classifier
    from data import normalize
    pretrained = os.path.join(REPO, "models", "pretrained")
    run("generate.py", "--model", os.path.join(pretrained, "vqvae_mnist.pt"), "--input", "prior",
        "--prior-model", os.path.join(pretrained, "prior_mnist.pt"), "--digit", "3",
        "--temperature", "0.7", "--num-samples", "50", "--samples-out", "threes.pt",
        "--filename", "threes", cwd=tmp_path, in_process=True)
    judge = load_classifier(os.path.join(pretrained, "classifier.pt"), "cpu")
    samples = torch.load(tmp_path / "threes.pt", weights_only=True)
    with torch.no_grad():
        digits = judge(normalize(samples[:, 0])).argmax(1)
    assert (digits == 3).float().mean() >= 0.9, digits.tolist()


@pytest.mark.parametrize("case", ["missing", "digit", "temperature", "other_k", "vqvae_as_prior",
                                  "guidance_without_null_label", "top_p"])
def test_generate_prior_rejects_bad_input(trained_prior, tmp_path, case):
    cwd, _ = trained_prior
    vqvae, prior = str(cwd / "models/tiny/best.pt"), str(cwd / "models/prior/best.pt")
    if case in ("other_k", "guidance_without_null_label"):
        other = tmp_path / "other.pt"
        checkpoint = torch.load(prior, weights_only=True)
        if case == "other_k":
            checkpoint["config"]["k"] = 64
        else:  # as a prior trained with --label-dropout 0: ten class rows, no null label
            checkpoint["config"]["label_dropout"] = 0.0
            rows = checkpoint["state_dict"]["class_embedding.weight"]
            checkpoint["state_dict"]["class_embedding.weight"] = rows[:10]
        save_checkpoint(str(other), checkpoint)
        prior = str(other)
    args, words = {
        "missing": (["--prior-model", "nope.pt"], ["--prior-model", "nope.pt"]),
        "digit": (["--prior-model", prior, "--digit", "10"], ["--digit"]),
        "temperature": (["--prior-model", prior, "--temperature", "0"], ["--temperature"]),
        "other_k": (["--prior-model", prior], ["K=64", "K=32"]),
        "vqvae_as_prior": (["--prior-model", vqvae], ["vqvae checkpoint", "--prior-model"]),
        "guidance_without_null_label": (["--prior-model", prior, "--guidance-scale", "2"],
                                        ["--guidance-scale", "--label-dropout"]),
        "top_p": (["--prior-model", prior, "--top-p", "1.5"], ["--top-p"]),
    }[case]
    result = run("generate.py", "--model", vqvae, "--input", "prior", *args, cwd=tmp_path,
                 check=False, in_process=True)
    assert_clean_failure(result, *words)


def test_generate_guides_by_default_only_priors_that_can_be_guided(trained_prior, tmp_path,
                                                                  monkeypatch):
    """Without --guidance-scale: the measured default for a prior trained with label dropout, no
    guidance (scale 1) for a conditional-only one, instead of an error."""
    import gated_pixelcnn
    from sampling import DEFAULT_GUIDANCE_SCALE
    cwd, _ = trained_prior
    prior = str(cwd / "models/prior/best.pt")
    checkpoint = torch.load(prior, weights_only=True)
    checkpoint["config"]["label_dropout"] = 0.0
    checkpoint["state_dict"]["class_embedding.weight"] = \
        checkpoint["state_dict"]["class_embedding.weight"][:10]
    save_checkpoint(str(tmp_path / "conditional.pt"), checkpoint)
    scales = []
    original = gated_pixelcnn.GatedPixelCNN.sample
    monkeypatch.setattr(gated_pixelcnn.GatedPixelCNN, "sample", lambda self, labels, **kw: (
        scales.append(kw["guidance_scale"]), original(self, labels, **kw))[1])
    for path in (prior, "conditional.pt"):
        run("generate.py", "--model", str(cwd / "models/tiny/best.pt"), "--input", "prior",
            "--prior-model", path, cwd=tmp_path, in_process=True)
    assert scales == [DEFAULT_GUIDANCE_SCALE, 1.0]


def test_resume_rejects_weights_only_checkpoints(tmp_path, data_folder):
    pretrained = os.path.join(REPO, "models", "pretrained", "prior_mnist.pt")
    result = run("pixelcnn_prior.py", "--resume", pretrained, "--vqvae-model",
                 os.path.join(REPO, "models", "pretrained", "vqvae_mnist.pt"), "--data-folder",
                 data_folder, cwd=tmp_path, check=False, in_process=True)
    assert_clean_failure(result, "--resume", "optimizer state")
    bare = torch.load(os.path.join(REPO, "models", "pretrained", "vqvae_mnist.pt"),
                      weights_only=True)["state_dict"]
    torch.save(bare, tmp_path / "bare.pt")  # the seed's checkpoint format
    result = run("VQ-VAE.py", "--resume", "bare.pt", "--data-folder", data_folder, cwd=tmp_path,
                 check=False, in_process=True)
    assert_clean_failure(result, "--resume bare.pt", "optimizer state")
    assert not (tmp_path / "models").exists()


# -------------------------------------------- the prior's and the classifier's run guarantees
def interrupt_then_resume(script, flags, cwd, name, first_line, signum=2):
    """Start `script`, send `signum` once it has printed `first_line`, check the stop, resume."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, os.path.join(REPO, script), "--output-folder",
                                name, *flags], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().startswith(first_line)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert f"--resume models/{name}/last.pt" in stderr
    cut = torch.load(cwd / "models" / name / "last.pt", weights_only=True)
    assert cut["metrics"] is None and 0 < cut["batch_in_epoch"]  # stopped mid-epoch
    run(script, "--resume", f"models/{name}/last.pt", *flags[flags.index("--data-folder"):][:2],
        cwd=cwd)
    return cut


def prior_flags(trained_run, data_folder):
    cwd, _ = trained_run
    return ["--vqvae-model", str(cwd / "models" / "tiny" / "best.pt"), "--data-folder",
            data_folder, "--train-subset", "4096", "--test-subset", "256", "--num-epochs", "1",
            "--num-layers", "4", "--hidden-size", "32"]


def test_prior_signal_then_resume_is_bit_identical(trained_run, data_folder, tmp_path):
    flags = prior_flags(trained_run, data_folder)
    run("pixelcnn_prior.py", "--output-folder", "whole", *flags, cwd=tmp_path)
    interrupt_then_resume("pixelcnn_prior.py", flags, tmp_path, "cut", "prior")
    assert_same_weights(tmp_path / "models" / "whole" / "last.pt",
                        tmp_path / "models" / "cut" / "last.pt")


@pytest.mark.parametrize("script", ["pixelcnn_prior.py", "classifier.py"])
def test_other_trainers_stop_on_nan_without_writing(trained_run, data_folder, tmp_path, script):
    flags = prior_flags(trained_run, data_folder) if script == "pixelcnn_prior.py" else \
        ["--data-folder", data_folder, "--train-subset", "1024", "--test-subset", "500",
         "--num-epochs", "1"]
    result = run(script, "--output-folder", "nan", *flags, "--lr", "1e30", "--log-every", "2",
                 cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "loss became nan at step" in result.stderr
    assert not os.listdir(tmp_path / "models" / "nan")


CLASSIFIER = ["--train-subset", "3072", "--test-subset", "1000", "--num-epochs", "2", "--seed", "1"]


@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory, data_folder):
    cwd = tmp_path_factory.mktemp("judge")
    result = run("classifier.py", "--output-folder", "judge", "--data-folder", data_folder,
                 *CLASSIFIER, cwd=cwd)
    return cwd, result


def test_classifier_keeps_its_best_epoch_and_resumes_bit_identically(trained_classifier, tmp_path,
                                                                     data_folder):
    cwd, result = trained_classifier
    accuracies = [float(line.split()[-1]) for line in result.stdout.splitlines()
                  if line.startswith("epoch")]
    best = torch.load(cwd / "models" / "judge" / "best.pt", weights_only=True)
    assert len(accuracies) == 2 and best["metrics"]["test_accuracy"] == max(accuracies) > 0.9
    interrupt_then_resume("classifier.py", ["--data-folder", data_folder, *CLASSIFIER], tmp_path,
                          "judge", "training", signum=15)
    assert_same_weights(cwd / "models" / "judge" / "last.pt",
                        tmp_path / "models" / "judge" / "last.pt")


@pytest.mark.parametrize("script", ["classifier.py", "pixelcnn_prior.py"])
def test_other_trainers_refuse_overwrites_and_paths(trained_classifier, trained_run, script):
    cwd, _ = trained_classifier
    vqvae = ["--vqvae-model", str(trained_run[0] / "models" / "tiny" / "best.pt")] * \
        (script == "pixelcnn_prior.py")
    (cwd / "models" / "taken").mkdir(exist_ok=True)
    (cwd / "models" / "taken" / "last.pt").write_bytes(b"an earlier run")
    result = run(script, "--output-folder", "taken", *vqvae, "--data-folder", "nowhere", cwd=cwd,
                 check=False, in_process=True)
    assert_clean_failure(result, "--overwrite", "--resume")
    assert (cwd / "models" / "taken" / "last.pt").read_bytes() == b"an earlier run"
    for name in ("a/b", "..", "/tmp/x"):
        result = run(script, "--output-folder", name, *vqvae, "--data-folder", "nowhere",
                     cwd=cwd, check=False, in_process=True)
        assert_clean_failure(result, "--output-folder")
    assert sorted(os.listdir(cwd / "models")) == ["judge", "taken"]  # the checks ran first:
    assert not (cwd / "nowhere").exists()                             # no data was extracted


# ------------------------------------------------------------------------------ device-agnostic
def test_training_step_never_reads_a_value_back_to_the_host(data_folder, monkeypatch):
    """On the meta device tensors have shapes but no values, so every op that needs a value on the
    host (.item(), bool(), torch.bincount, boolean masks, nonzero) raises there: a step that runs
    on meta, k-means init, EMA update, dead-code restart and code usage included, has no host sync
    on CUDA either. (Autocast knows no meta device; it is a no-op here.)"""
    import contextlib
    from modules import DEFAULT_CONFIG
    from training import code_usage, make_optimizer, make_precision, make_scheduler
    from training import train_step
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: contextlib.nullcontext())
    split = MNISTSplit(data_folder, True, "meta", limit=256)
    model = vqvae_from_config(DEFAULT_CONFIG).to("meta")
    optimizer = make_optimizer(model, 2e-4, "meta")
    scheduler = make_scheduler(optimizer, "cosine", 4)
    amp_dtype, scaler = make_precision("meta", False)
    pending = []
    for images, _ in split.batches(64, torch.randperm(256)):
        loss, reconstruction, codebook, commitment, indices = \
            train_step(model, optimizer, scaler, images, 1.0, False, amp_dtype)
        scheduler.step()
        _, perplexity, used = code_usage(indices, 512)
        pending.append(torch.stack([loss, reconstruction, codebook, commitment, perplexity,
                                    used.float()]))
    assert len(pending) == 4 and torch.stack(pending).device.type == "meta"
    assert not model.codeBook._needs_init  # the k-means init ran too


@pytest.mark.parametrize("device_type, capability, cpu_bf16, expected", [
    ("cuda", (7, 5), False, (torch.float16, True)),    # Colab T4: fp16 with loss scaling
    ("cuda", (7, 0), False, (torch.float16, True)),    # V100
    ("cuda", (8, 0), False, (torch.bfloat16, False)),  # A100
    ("cuda", (9, 0), False, (torch.bfloat16, False)),  # H100, H200
    ("cpu", None, True, (torch.bfloat16, False)),      # AVX512-BF16 or AMX
    ("cpu", None, False, (None, False)),                # float32
])
def test_amp_precision_fits_the_hardware(device_type, capability, cpu_bf16, expected):
    from training import amp_precision
    assert amp_precision(device_type, capability, cpu_bf16) == expected


def test_amp_without_native_bf16_warns_and_trains_in_float32(monkeypatch, capsys):
    import training
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
    amp_dtype, scaler = training.make_precision("cpu", True)
    assert amp_dtype is None and not scaler.is_enabled()
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "--amp" in warning[0] and "float32" in warning[0]
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    assert training.make_precision("cpu", True)[0] == torch.bfloat16
    assert training.make_precision("cpu", False)[0] is None


def test_resume_restores_the_rng_of_the_gpus_present(monkeypatch, capsys):
    """A checkpoint of a 2-GPU machine resumed on a 1-GPU one: GPU 0 gets its state, GPU 1's is
    skipped with a warning (set_rng_state_all would fail)."""
    import runs
    restored = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.append(
        (state.tolist(), index)))
    runs.restore_cuda_rng([torch.tensor([1], dtype=torch.uint8),
                              torch.tensor([2], dtype=torch.uint8)])
    assert restored == [([1], 0)]
    warning = capsys.readouterr().err
    assert "2 GPU(s)" in warning and "has 1" in warning
    runs.restore_cuda_rng([])  # a CPU run's checkpoint: nothing to restore, nothing to say
    assert restored == [([1], 0)] and capsys.readouterr().err == ""


def test_optimizer_kernels_follow_the_device():
    """A checkpoint's optimizer state carries the kernel choice of the device it was written on;
    a resume keeps the choice made for this device (and every other hyperparameter from the file)."""
    from checkpoints import load_optimizer_state
    from training import make_optimizer
    model = torch.nn.Linear(3, 2)
    written = torch.optim.Adam(model.parameters(), lr=0.5)
    written.zero_grad()
    model(torch.ones(1, 3)).sum().backward()
    written.step()
    state = written.state_dict()
    state["param_groups"][0]["fused"] = True   # as written by a CUDA run
    optimizer = make_optimizer(model, 2e-4, "cpu")
    load_optimizer_state(optimizer, state)
    assert not optimizer.param_groups[0]["fused"] and optimizer.param_groups[0]["lr"] == 0.5
    assert optimizer.state_dict()["state"][0]["exp_avg"].abs().sum() > 0


# -------------------------------------------------------------------------------------------- DDP
def test_torchrun_ddp_on_cpu_matches_single_process(tmp_path):
    """torchrun with 2 processes and a single-process run started at the same moment on one fresh
    --data-folder (three processes extract MNIST into it at once), then compared."""
    flags = ["--data-folder", "fresh", "--num-epochs", "1", "--max-steps", "8",
             "--codebook-init", "uniform", "--dead-code-threshold", "0", *TINY,
             # The EMA codebook dominates the comparison below; at decay 0.9 the per-rank
             # BatchNorm differences reach it 10x faster than at the 0.99 the bound was set for.
             "--ema-decay", "0.99"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    processes = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for command in (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(REPO, "VQ-VAE.py"), "--output-folder", "ddp", *flags],
        [sys.executable, os.path.join(REPO, "VQ-VAE.py"), "--output-folder", "single", *flags])]
    (ddp_out, ddp_err), (_, single_err) = [process.communicate(timeout=600) for process in processes]
    assert processes[0].returncode == 0, ddp_err[-3000:]
    assert processes[1].returncode == 0, single_err[-3000:]
    checksums = sorted(line for line in ddp_out.splitlines() if "parameter checksum" in line)
    assert len(checksums) == 2  # one per rank, and the replicas ended identical:
    assert checksums[0].split()[-1] == checksums[1].split()[-1], checksums
    ddp = torch.load(tmp_path / "models/ddp/last.pt", weights_only=True)
    single = torch.load(tmp_path / "models/single/last.pt", weights_only=True)
    assert ddp["step"] == single["step"] == 8
    torch.manual_seed(3)
    init = vqvae_from_config(single["config"]).state_dict()
    keys = [name for name, _ in vqvae_from_config(single["config"]).named_parameters()]
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
    import signal
    import time
    flags = ["--data-folder", "fresh", "--num-epochs", "2", *TINY, "--train-subset", "4096",
             "--log-every", "2"]
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
    cut = torch.load(tmp_path / "models" / "ddp" / "last.pt", weights_only=True)
    assert cut["step"] == step and 0 < step < 128
    result = subprocess.run([*torchrun, "--resume", "models/ddp/last.pt", "--data-folder",
                             "fresh"], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checksums = sorted(line for line in result.stdout.splitlines() if "parameter checksum" in line)
    assert len(checksums) == 2 and checksums[0].split()[-1] == checksums[1].split()[-1], checksums
    assert torch.load(tmp_path / "models" / "ddp" / "last.pt", weights_only=True)["step"] == 128


def test_benchmark_reports_both_pipelines(tmp_path, data_folder):
    import json
    result = run("benchmark.py", "--data-folder", data_folder, "--steps", "2", "--warmup", "1",
                 "--num-workers", "0", "--prior-samples", "20", "--json", cwd=tmp_path)
    report = json.loads(result.stdout)
    assert [row["pipeline"].split()[0] for row in report["rows"]] == ["seed-style", "fast"]
    for row in report["rows"]:  # figures are printed, never asserted on
        assert row["ms_per_step"] > 0 and row["images_per_s"] > 0 and row["s_per_epoch"] > 0
    assert report["speedup"] > 0
    assert report["prior_samples"]["n"] == 20 and report["prior_samples"]["s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs every script for minutes on a GPU")
def test_gpu_check_says_there_is_no_gpu_and_exits_0(tmp_path):
    import json
    result = run("gpu_check.py", cwd=tmp_path, check=False, in_process=True)
    assert result.returncode in (0, None), result.stderr
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


def test_notebook_runs_headless_resumes_and_makes_its_files(tmp_path, monkeypatch):
    """VQ-VAE.ipynb, every cell, in a fresh kernel, shrunk by VQVAE_NOTEBOOK_SMOKE=1, in a folder
    that looks like a clone, with no `tensorboard` program on PATH (an unactivated virtual
    environment) and a scratch folder standing in for Google Drive. TensorBoard starts before the
    training cell and shows the run while the server lives; after a simulated disconnect (the run's
    last epoch lost) the training cell resumes instead of overwriting, and ends bit-identically;
    a failing script's own error line shows in its cell."""
    import json
    import shutil
    import signal
    import time
    import urllib.request
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from tensorboard import manager
    for name in os.listdir(REPO):
        if name.endswith((".py", ".txt")) or name == "MNIST":
            (tmp_path / name).symlink_to(os.path.join(REPO, name))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "pretrained").symlink_to(os.path.join(REPO, "models", "pretrained"))
    drive = tmp_path / "drive"
    monkeypatch.setenv("VQVAE_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("VQVAE_NOTEBOOK_DRIVE", str(drive))
    monkeypatch.setenv("PATH", os.pathsep.join(
        folder for folder in os.environ["PATH"].split(os.pathsep)
        if not os.path.exists(os.path.join(folder, "tensorboard"))))
    servers_before = {info.pid for info in manager.get_all()}
    notebook = nbformat.read(os.path.join(REPO, "VQ-VAE.ipynb"), as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells)  # committed without outputs
    training_cell = next(i for i, cell in enumerate(notebook.cells)
                         if 'train("VQ-VAE.py"' in cell.source)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    server = None

    def runs_shown():
        with urllib.request.urlopen(f"http://localhost:{server.port}/data/runs", timeout=30) as r:
            return json.loads(r.read())

    with client.setup_kernel():
        try:
            for index, cell in enumerate(notebook.cells):
                if index == training_cell:  # started by the %tensorboard magic, before training
                    server = next(info for info in manager.get_all()
                                  if info.pid not in servers_before)
                    assert runs_shown() == []
                client.execute_cell(cell, index)
            deadline = time.time() + 60  # the server reads logs/ again every 5 s
            while "colab" not in runs_shown() and time.time() < deadline:
                time.sleep(1)
            assert "colab" in runs_shown()
            # A disconnect: the machine's disk is gone, Drive holds the run up to epoch 1.
            kept = drive / "models" / "colab"
            first = torch.load(kept / "model_2.pt", weights_only=True)
            epoch_1 = (kept / "model_1.pt").read_bytes()
            shutil.copy(kept / "model_1.pt", kept / "last.pt")
            (kept / "model_2.pt").unlink()
            cell = notebook.cells[training_cell]
            client.execute_cell(cell, training_cell)
            assert "resuming" in "".join(output.get("text", "") for output in cell.outputs)
            again = torch.load(kept / "model_2.pt", weights_only=True)
            assert (kept / "model_1.pt").read_bytes() == epoch_1
            for key, value in first["state_dict"].items():
                assert torch.equal(value, again["state_dict"][key]), key
            failing = nbformat.v4.new_code_cell('sh("generate.py", "--model", "missing.pt")')
            with pytest.raises(CellExecutionError):
                client.execute_cell(failing, len(notebook.cells))
            shown = "".join(output.get("text", "") for output in failing.outputs)
            assert "error: --model missing.pt: no such file" in shown, shown
        finally:
            if server:
                os.kill(server.pid, signal.SIGTERM)
    errors = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    assert not errors, errors
    shown = "".join(output.get("text", "") for cell in notebook.cells
                    for output in cell.get("outputs", []))
    assert "epoch 2/2" in shown and "test MSE" in shown  # the scripts' output shows in the notebook
    assert os.path.realpath(tmp_path / "models" / "colab") == str(drive / "models" / "colab")
    for path in ("models/colab/best.pt", "models/colab_prior/best.pt",
                 "generatedImages/colab_reconstructions.png", "generatedImages/colab_digits.png",
                 "generatedImages/colab_prior_digits.png"):
        assert (tmp_path / path).exists(), path


def test_sample_quality_reports_every_source(trained_prior, data_folder):
    import json
    cwd, _ = trained_prior
    result = run("sample_quality.py", "--model", "models/tiny/best.pt", "--prior-model",
                 "models/prior/best.pt", "--num-samples", "200", "--guidance-scales", "1", "3",
                 "--data-folder", data_folder, "--json", cwd=cwd)
    rows = {row["source"]: row for row in json.loads(result.stdout)}
    assert len(rows) == 8 and all(row["images"] == 200 for row in rows.values())
    assert {"prior, guidance 1, temperature 1", "prior, guidance 3, temperature 1"} <= rows.keys()
    # both committed judges, each with every figure; agreement is the judge's accuracy on what it
    # is shown: for real images, checked here by hand (the tiny VQ-VAE barely reconstructs; the
    # committed models are judged in the next test)
    from checkpoints import load_classifier
    from data import normalize
    test = MNISTSplit(data_folder, False, "cpu", limit=200)
    for name in ("classifier", "classifier_mlp"):
        judged = {source: row["judges"][name] for source, row in rows.items()}
        assert judged["real: held-out training images (floor)"]["agreement"] > 0.9, name
        for real in ("real: held-out training images (floor)",
                     "real: test images (the reference itself)"):
            assert judged[real]["frechet_distance"] < \
                judged["codes drawn uniformly"]["frechet_distance"], name
        judge = load_classifier(os.path.join(REPO, "models", "pretrained", name + ".pt"), "cpu")
        with torch.no_grad():
            correct = (judge(normalize(test.images)).argmax(1) == test.labels).float().mean()
        assert judged["real: test images (the reference itself)"]["agreement"] == \
            pytest.approx(correct.item()), name


def test_committed_models_make_real_digits(tmp_path, data_folder):
    """The committed VQ-VAE, prior and judges fit together: under both judges, reconstructions and
    prior samples (generate.py's default sampler) are read as the digits asked for and lie far
    closer to real digits than uniformly drawn codes."""
    import json
    pretrained = os.path.join(REPO, "models", "pretrained")
    result = run("sample_quality.py", "--model", os.path.join(pretrained, "vqvae_mnist.pt"),
                 "--prior-model", os.path.join(pretrained, "prior_mnist.pt"), "--num-samples",
                 "200", "--data-folder", data_folder, "--json", cwd=tmp_path)
    rows = {row["source"]: row for row in json.loads(result.stdout)}
    sampled = [source for source in rows if source.startswith("prior, guidance")]
    assert len(sampled) == 1, rows.keys()
    for name in ("classifier", "classifier_mlp"):
        uniform = rows["codes drawn uniformly"]["judges"][name]["frechet_distance"]
        for source in sampled + [
                "VQ-VAE reconstructions of held-out training images (the prior's ceiling)"]:
            figures = rows[source]["judges"][name]
            assert figures["agreement"] > 0.9, (name, source, figures)
            assert figures["frechet_distance"] < uniform / 10, (name, source, figures, uniform)
