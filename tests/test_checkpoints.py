"""Checkpoint files (checkpoints.py): written atomically, read with weights_only=True, refused in one
line when foreign or damaged; every format written so far still loads (the committed checkpoints,
files from before model configs, the original repo's bare state_dicts)."""
import json
import os
import pickle
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import load_checkpoint, load_classifier, load_prior, load_vqvae, save_checkpoint
from conftest import PRETRAINED_VQVAE, REPO, assert_clean_failure, load_script, run
from data import MNISTSplit
from modules import VQVAEConfig, VectorQuantizedVAE, original_config_with, vqvae_from_config

PRETRAINED = os.path.join(REPO, "models", "pretrained")


def test_checkpoint_round_trip(tmp_path):
    config = VQVAEConfig(hidden_size=8, k=16, dead_code_threshold=0.5)
    model = vqvae_from_config(config)
    model(torch.rand(8, 1, 28, 28))  # k-means init + an EMA step change the buffers
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, {"kind": "vqvae", "state_dict": model.state_dict(),
                           "model_config": asdict(config)})
    assert os.listdir(tmp_path) == ["m.pt"]  # no temp file left behind
    clone, _ = load_vqvae(path, "cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(value, clone.state_dict()[key]), key
    assert not clone.codeBook._needs_init
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model.eval()(x)[0], clone(x)[0])


def test_committed_checkpoints_load_and_resume(tmp_path):
    """Three committed files predate model configs (one "config": the command line), the prior
    and the third judge have one: each loads as the model it is, and the committed VQ-VAE still
    resumes, finding its run complete."""
    vqvae, checkpoint = load_vqvae(os.path.join(PRETRAINED, "vqvae_mnist.pt"), "cpu")
    assert "model_config" not in checkpoint and checkpoint["config"]["k"] == 512
    assert vqvae.codeBook.codebook == "ema" and vqvae.codeBook.dead_code_threshold == 6.0
    prior = load_prior(os.path.join(PRETRAINED, "prior_mnist.pt"), "cpu", 512)
    assert type(prior).__name__ == "GatedPixelCNN" and len(prior.layers) == 12
    assert prior.embedding.embedding_dim == 96 and prior.null_label == 10
    assert prior.shift_embedding.num_embeddings == 9  # trained with --shift-augment 1
    committed = torch.load(os.path.join(PRETRAINED, "prior_mnist.pt"), weights_only=True)
    assert committed["run_config"]["hold_out"] == 10000  # sample_quality's reference unseen
    assert committed["run_config"]["num_epochs"] == 16 and committed["epoch"] == 16  # model.txt
    assert committed["metrics"]["test_bits_per_map"] == pytest.approx(187.34, abs=0.01)
    assert committed["state_dict"]["layers.1.vertical.weight"].dtype == torch.int8  # 3 MB, not 6
    assert type(load_classifier(os.path.join(PRETRAINED, "classifier.pt"), "cpu")).__name__ == \
        "MNISTClassifier"
    assert type(load_classifier(os.path.join(PRETRAINED, "classifier_mlp.pt"), "cpu")).__name__ \
        == "MNISTMLPClassifier"
    assert type(load_classifier(os.path.join(PRETRAINED, "classifier_aug.pt"), "cpu")).__name__ \
        == "MNISTClassifier"  # the third judge: written with model_config
    result = run("VQ-VAE.py", "--resume", os.path.join(PRETRAINED, "vqvae_mnist.pt"),
                 "--output-folder", "committed", "--data-folder", "fresh", cwd=tmp_path)
    assert "is complete: 10 of 10 epochs" in result.stdout
    assert os.listdir(tmp_path) == []   # no run folders, no MNIST extracted: nothing to train


def test_checkpoints_keep_the_model_apart_from_the_command_line(trained_prior, trained_classifier):
    """model_config holds the network's config and nothing of the run; run_config the flags."""
    cwd, _ = trained_prior
    prior = torch.load(cwd / "models" / "prior" / "last.pt", weights_only=True)
    assert prior["model_config"] == {"arch": "gated_pixelcnn", "k": 32, "channels": 32,
                                     "num_layers": 4, "num_classes": 10, "dropout": 0.1,
                                     "unconditional": True, "shift_augment": 0}
    assert prior["run_config"]["channels"] == 32 and "k" not in prior["run_config"]
    judge = torch.load(trained_classifier[0] / "models" / "judge" / "last.pt", weights_only=True)
    assert judge["model_config"] == {"arch": "cnn"}


def original_repo_checkpoint(path):
    """A checkpoint as the original repo writes it: its model (this repo's network with the original's
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
        "--data-folder", data_folder, cwd=tmp_path)
    grid = np.asarray(Image.open(tmp_path / "generatedImages" / "seed.png").convert("L")) / 255.0
    from torchvision.utils import make_grid
    images, _ = next(MNISTSplit(data_folder, False, "cpu", limit=100).batches(100))
    real = make_grid(images, nrow=10, normalize=True, value_range=(-1, 1))[0].numpy()
    assert grid.std() > 0.1  # not blank, and far closer to the input than its mean image is
    assert ((grid - real) ** 2).mean() < 0.1 * ((real.mean() - real) ** 2).mean()
    figures = [json.loads(run("evaluate.py", "--model", model, "--data-folder", data_folder,
                              "--test-subset", 500, "--json", cwd=tmp_path).stdout)
               for model in ("best.pt", PRETRAINED_VQVAE)]
    assert figures[0] == figures[1]  # the same weights as the committed checkpoint: same figures
    assert figures[0]["test_mse"] < 0.02


def test_original_repo_checkpoint_of_other_sizes_loads_at_its_codebooks_sizes(tmp_path):
    """The original repo trained other sizes with --hidden-size/--k and saved no config: its
    codebook (K, D) says them, so the file loads without those flags; typed sizes must agree."""
    original = vqvae_from_config(original_config_with(hidden_size=16, k=32))
    torch.save(original.state_dict(), tmp_path / "small.pt")
    model, _ = load_vqvae(str(tmp_path / "small.pt"), "cpu")
    assert model.codeBook.embedding.weight.shape == (32, 16)
    result = run("generate.py", "--model", "small.pt", "--k", "64", "--input", "random",
                 cwd=tmp_path, check=False)
    assert_clean_failure(result, "--k 64", "small.pt", "trained with 32")
    empty = {**original.state_dict(), "codeBook.embedding.weight": torch.zeros(0, 16)}
    torch.save(empty, tmp_path / "empty.pt")
    result = run("generate.py", "--model", "empty.pt", "--input", "random", cwd=tmp_path,
                 check=False)
    assert_clean_failure(result, "empty.pt", "k 0 is not a positive integer")


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
                 "--input", "random", cwd=tmp_path, check=False)
    assert_clean_failure(result, "damaged.pt", key)
    assert "cluster_size" not in result.stderr  # the filled buffers are never named
    assert not (tmp_path / "generatedImages").exists()


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
    result = run("generate.py", "--model", "prior.pt", cwd=tmp_path, check=False)
    assert_clean_failure(result, "prior checkpoint", "pixelcnn_prior.py")


@pytest.mark.parametrize("kind", ["empty", "truncated", "plain pickle", "folder"])
def test_empty_truncated_or_foreign_checkpoint_is_refused(trained_run, tmp_path, kind):
    """One line each, torch's own warnings included (a plain pickle's protocol warning)."""
    cwd, _ = trained_run
    data = (cwd / "models" / "tiny" / "best.pt").read_bytes()
    if kind == "folder":
        (tmp_path / "cut.pt").mkdir()
    elif kind == "plain pickle":
        (tmp_path / "cut.pt").write_bytes(pickle.dumps({"state_dict": {}}, protocol=4))
    else:
        (tmp_path / "cut.pt").write_bytes(data[:{"empty": 0, "truncated": 100}[kind]])
    with warnings.catch_warnings(record=True) as caught:  # what a process would print
        warnings.simplefilter("always")
        result = run("evaluate.py", "--model", "cut.pt", cwd=tmp_path, check=False)
    assert_clean_failure(result, "cut.pt", "folder" if kind == "folder" else "not a PyTorch")
    assert not caught, [str(w.message) for w in caught]


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
    with pytest.raises(OSError):   # a new name claimed (replace=False) is released on failure
        save_checkpoint(str(tmp_path / "new.pt"), {}, replace=False)
    assert os.listdir(tmp_path) == ["last.pt"]


def test_a_config_this_version_cannot_build_is_refused_in_one_line(tmp_path):
    checkpoint = torch.load(PRETRAINED_VQVAE, weights_only=True)
    save_checkpoint(str(tmp_path / "future.pt"), {
        "kind": "vqvae", "state_dict": checkpoint["state_dict"],
        "model_config": {**asdict(VQVAEConfig()), "a_field_of_the_future": 1}})
    result = run("evaluate.py", "--model", "future.pt", cwd=tmp_path, check=False)
    assert_clean_failure(result, "future.pt", "a_field_of_the_future")
    prior = torch.load(os.path.join(PRETRAINED, "prior_mnist.pt"), weights_only=True)
    old = {**prior["run_config"], "k": 512, "hidden_size": 96}  # a file's one "config" of old
    del old["num_layers"]
    save_checkpoint(str(tmp_path / "old_prior.pt"), {"kind": "prior", "config": old,
                                                      "state_dict": prior["state_dict"]})
    result = run("generate.py", "--model", PRETRAINED_VQVAE, "--input", "prior", "--prior-model",
                 "old_prior.pt", cwd=tmp_path, check=False)
    assert_clean_failure(result, "old_prior.pt", "num_layers")


@pytest.mark.parametrize("junk", [{"quantizer": "foo"}, {"k": 0}, {"hidden_size": 0},
                                  {"hidden_size": -3}, {"hidden_size": "40"},
                                  {"state_dict": [1, 2]}, {"kind": ["vqvae"]}])
def test_a_checkpoint_with_junk_values_is_refused_in_one_line(trained_run, tmp_path, junk):
    """Values no model can have, in a file's config or in place of its weights: one line naming the
    file, as for a missing field."""
    cwd, _ = trained_run
    checkpoint = torch.load(cwd / "models" / "tiny" / "best.pt", weights_only=True)
    for key, value in junk.items():
        if key in checkpoint:
            checkpoint[key] = value
        else:
            checkpoint["model_config"][key] = value
    save_checkpoint(str(tmp_path / "junk.pt"), checkpoint)
    result = run("evaluate.py", "--model", "junk.pt", cwd=tmp_path, check=False)
    assert_clean_failure(result, "junk.pt")


def test_weights_holding_nan_or_infinity_are_refused_in_one_line(tmp_path):
    """A damaged file whose weights hold NaN or infinity (training never saves them) would draw a
    blank grid or score NaN: every loader refuses it, naming the file and the weight, also in an
    original-style bare state_dict and through an int8 file's scales."""
    checkpoint = torch.load(PRETRAINED_VQVAE, weights_only=True)
    checkpoint["state_dict"]["decoder.6.weight"].view(-1)[5] = float("nan")
    save_checkpoint(str(tmp_path / "nan.pt"), checkpoint)
    bare = {k: v.clone() for k, v in checkpoint["state_dict"].items()}
    bare["decoder.6.weight"].view(-1)[5] = float("inf")
    save_checkpoint(str(tmp_path / "bare.pt"), bare)
    prior = torch.load(os.path.join(PRETRAINED, "prior_mnist.pt"), weights_only=True)
    next(iter(prior["int8_scales"].values()))[0] = float("nan")
    save_checkpoint(str(tmp_path / "prior.pt"), prior)
    for script, flags, name in (("evaluate.py", ["--model", "nan.pt"], "nan.pt"),
                                ("generate.py", ["--model", "bare.pt"], "bare.pt"),
                                ("generate.py", ["--model", PRETRAINED_VQVAE, "--input", "prior",
                                                 "--prior-model", "prior.pt"], "prior.pt")):
        result = run(script, *flags, cwd=tmp_path, check=False)
        assert_clean_failure(result, name, "NaN or infinite")
    assert not os.path.exists(tmp_path / "generatedImages")


def test_a_size_that_contradicts_the_checkpoint_names_the_flag_typed(tmp_path):
    result = run("evaluate.py", "--model", PRETRAINED_VQVAE, "--hidden-size-vae", 64, cwd=tmp_path,
                 check=False)
    assert_clean_failure(result, "--hidden-size-vae 64", "trained with 40")


def test_export_checkpoint_shares_weights_without_the_training_state(tmp_path, trained_prior,
                                                                    monkeypatch):
    """export_checkpoint.py: float16 and int8 (one scale per output channel) files of a prior's
    best.pt load as that prior, with logits within each format's rounding, and cannot be
    --resume'd; an existing --out is kept; int8 weights without their scales, or scales that fit
    no weight, are refused in one line."""
    cwd, _ = trained_prior
    best = str(cwd / "models" / "prior" / "best.pt")
    reference = load_prior(best, "cpu", 32)
    codes, labels = torch.randint(0, 32, (16, 7, 7)), torch.arange(16) % 10
    expected = reference(codes, labels)
    for flags, tolerance in (([], 0.05), (["--int8"], 0.2)):
        out = str(tmp_path / f"prior{''.join(flags)}.pt")
        result = run("export_checkpoint.py", "--model", best, "--out", out, *flags, cwd=tmp_path)
        assert ("int8 weights" if flags else "float16 weights") in result.stdout
        shared = torch.load(out, weights_only=True)
        assert {"optimizer", "training_state_dict", "rng"}.isdisjoint(shared)
        assert shared["metrics"] == torch.load(best, weights_only=True)["metrics"]
        weights = shared["state_dict"]["layers.1.vertical.weight"]
        assert weights.dtype == (torch.int8 if flags else torch.float16)
        difference = (load_prior(out, "cpu", 32)(codes, labels) - expected).abs().max().item()
        assert 0 < difference < tolerance, (flags, difference)
    int8 = str(tmp_path / "prior--int8.pt")
    assert os.path.getsize(int8) < 0.6 * os.path.getsize(str(tmp_path / "prior.pt"))
    before, files_before = os.path.getmtime(int8), len(os.listdir(tmp_path))
    result = run("export_checkpoint.py", "--model", best, "--out", int8, cwd=tmp_path, check=False)
    assert_clean_failure(result, "--out", "exists")
    assert os.path.getmtime(int8) == before
    # another export that wrote the file after this one's check: its file is kept all the same
    monkeypatch.setattr(load_script("export_checkpoint.py"), "check_file_to_write",
                        lambda *args, **kwargs: None)
    result = run("export_checkpoint.py", "--model", best, "--out", int8, cwd=tmp_path, check=False)
    assert_clean_failure(result, "--out", "exists", "another process")
    assert os.path.getmtime(int8) == before and len(os.listdir(tmp_path)) == files_before
    result = run("pixelcnn_prior.py", "--resume", int8, cwd=tmp_path, check=False)
    assert_clean_failure(result, "weights only")
    shared = torch.load(int8, weights_only=True)
    save_checkpoint(str(tmp_path / "unscaled.pt"), {k: v for k, v in shared.items()
                                                    if k != "int8_scales"})
    shared["int8_scales"]["layers.1.vertical.weight"] = torch.ones(3)
    save_checkpoint(str(tmp_path / "misscaled.pt"), shared)
    shared["int8_scales"] = {"no.such.weight": torch.ones(3)}
    save_checkpoint(str(tmp_path / "stray.pt"), shared)
    for name, words in (("unscaled.pt", ["integer (int8 without its scales?)",
                                         "layers.0.vertical.weight"]),
                        ("misscaled.pt", ["layers.1.vertical.weight", "has other scales"]),
                        ("stray.pt", ["no.such.weight", "is missing"])):
        result = run("generate.py", "--model", str(cwd / "models" / "tiny" / "best.pt"), "--input",
                     "prior", "--prior-model", name, cwd=tmp_path, check=False)
        assert_clean_failure(result, name, *words)


def test_export_checkpoint_keeps_a_vqvae_and_an_original_state_dict(tmp_path, trained_run,
                                                                    data_folder):
    """A VQ-VAE (transposed convolutions, the codebook's buffers, bool and integer buffers) and
    the original repo's bare state_dict export in int8 and reconstruct as before; a weight that
    is not finite, a file of tensors that is no VQ-VAE, or an --out in a missing folder, is
    refused in one line, nothing written."""
    cwd, _ = trained_run
    best = str(cwd / "models" / "tiny" / "best.pt")
    model, _ = load_vqvae(best, "cpu")
    original = vqvae_from_config(original_config_with(hidden_size=16, k=32)).eval()
    torch.save(original.state_dict(), str(tmp_path / "bare.pt"))  # as the original repo saves
    x, _ = next(MNISTSplit(data_folder, False, "cpu", limit=64).batches(64))
    for source, before, sizes in ((best, model, {}),
                                  (str(tmp_path / "bare.pt"), original, {"hidden_size": 16,
                                                                          "k": 32})):
        out = str(tmp_path / ("int8_" + os.path.basename(source)))
        run("export_checkpoint.py", "--model", source, "--out", out, "--int8", cwd=tmp_path)
        exported, _ = load_vqvae(out, "cpu", sizes=sizes)
        # mean, not max: a latent near two codewords may change its code with their rounding
        difference = (exported(x)[0] - before(x)[0]).abs().mean().item()
        assert 0 < difference < 0.02, (source, difference)
    broken = model.state_dict()
    broken["decoder.3.weight"] = broken["decoder.3.weight"] / 0.0
    torch.save(broken, str(tmp_path / "inf.pt"))
    broken["decoder.3.weight"] = torch.full_like(broken["decoder.3.weight"], 1e6)
    torch.save(broken, str(tmp_path / "huge.pt"))  # finite, but not in float16
    torch.save({"a": torch.zeros(3)}, str(tmp_path / "foreign.pt"))  # tensors, but no VQ-VAE's
    for args, words in ((["--model", "inf.pt", "--out", "x.pt"], ["inf.pt", "NaN or infinite"]),
                        (["--model", "foreign.pt", "--out", "x.pt"], ["--model foreign.pt"]),
                        (["--model", "huge.pt", "--out", "x.pt"], ["huge.pt", "float16's range"]),
                        (["--model", best, "--out", "inf.pt/y.pt"], ["inf.pt/y.pt", "is a file"])):
        result = run("export_checkpoint.py", *args, cwd=tmp_path, check=False)
        assert_clean_failure(result, *words)
    assert not os.path.exists(tmp_path / "x.pt") and os.path.isfile(tmp_path / "inf.pt")


def test_a_flipped_byte_in_a_checkpoint_is_refused(tmp_path):
    """torch.load does not check its zip records' CRCs: one flipped bit in a weight's bytes would
    load as a wrong weight. load_checkpoint checks them first, and names the file."""
    data = bytearray(open(PRETRAINED_VQVAE, "rb").read())
    data[len(data) // 3] ^= 1
    (tmp_path / "flipped.pt").write_bytes(data)
    with pytest.raises(SystemExit) as exit_info:
        load_checkpoint(str(tmp_path / "flipped.pt"), "vqvae")
    assert exit_info.value.code == 2
    result = run("generate.py", "--model", "flipped.pt", "--input", "random", cwd=tmp_path,
                 check=False)
    assert_clean_failure(result, "flipped.pt", "checksum")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flipped.pt"]


def test_a_file_saved_without_crcs_loads(tmp_path):
    """torch can save without CRC-32s (they are 0 then): nothing to check, not a damaged file."""
    serialization = pytest.importorskip("torch.utils.serialization")
    monkeypatch_value = serialization.config.save.compute_crc32
    serialization.config.save.compute_crc32 = False
    try:
        torch.save(torch.load(PRETRAINED_VQVAE, weights_only=True), tmp_path / "no_crc.pt")
    finally:
        serialization.config.save.compute_crc32 = monkeypatch_value
    assert load_checkpoint(str(tmp_path / "no_crc.pt"), "vqvae")["state_dict"]


def test_a_priors_recorded_vqvae_is_found_where_it_can_be_known():
    """As recorded; a committed VQ-VAE recorded in another clone, in this one; another run of the
    same name elsewhere is not guessed at (it would be another VQ-VAE)."""
    from checkpoints import here
    assert here(PRETRAINED_VQVAE) == PRETRAINED_VQVAE
    assert here("/another/clone/models/pretrained/vqvae_mnist.pt") == PRETRAINED_VQVAE
    assert here("/another/clone/models/vqvae/best.pt") is None
    assert here("/another/clone/models/pretrained/missing.pt") is None and here(None) is None
