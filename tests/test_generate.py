"""generate.py: grids from a VQ-VAE and from a prior, the sampler's flags, bad input."""
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import save_checkpoint
from conftest import PRETRAINED_VQVAE, REPO, assert_clean_failure, run


@pytest.mark.parametrize("source", ["MNIST", "random"])
def test_generate_writes_a_grid(trained_run, data_folder, source):
    cwd, _ = trained_run
    run("generate.py", "--model", "models/tiny/best.pt", "--input", source, "--filename", source,
        "--data-folder", data_folder, cwd=cwd)
    image = np.asarray(Image.open(cwd / "generatedImages" / f"{source}.png").convert("L"))
    assert image.shape == (302, 302)
    assert image.std() > 10  # not blank


@pytest.mark.parametrize("case", ["input", "missing", "not_checkpoint", "other_sizes", "filename",
                                  "empty_filename", "long_filename", "empty_file", "seed",
                                  "digit_without_prior", "prior_model_without_prior"])
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
        "long_filename": (["--model", model, "--filename", "x" * 300], "--filename"),
        "seed": (["--model", model, "--seed", str(2 ** 64)], "--seed"),
        # a prior's flag would be ignored by a grid that samples no prior
        "digit_without_prior": (["--model", model, "--input", "random", "--digit", "3"],
                                "--digit applies to --input prior only"),
        "prior_model_without_prior": (["--model", model, "--prior-model", "notes.pt",
                                       "--guidance-scale", "2"], "--prior-model"),
    }[case]
    result = run("generate.py", *args, cwd=tmp_path, check=False)
    assert_clean_failure(result, word)
    assert not (tmp_path / "generatedImages").exists()


def test_generate_from_prior(trained_prior):
    cwd, _ = trained_prior
    run("generate.py", "--model", "models/tiny/best.pt", "--input", "prior", "--prior-model",
        "models/prior/best.pt", "--filename", "prior", "--temperature", "0.8",
        "--guidance-scale", "2", "--top-k", "8", "--top-p", "0.9",
        "--num-samples", "30", "--samples-out", "new/samples.pt", cwd=cwd)  # makes new/
    image = np.asarray(Image.open(cwd / "generatedImages" / "prior.png").convert("L"))
    assert image.shape == (302, 302) and image.std() > 10
    samples = torch.load(cwd / "new" / "samples.pt", weights_only=True)
    assert samples.shape == (30, 1, 28, 28) and samples.dtype == torch.uint8


def test_generate_digit_draws_that_digit(tmp_path, data_folder):
    """--digit 3 with the committed models: the committed judge reads (nearly) all samples as 3s
    (README: 99% agreement at the default sampler; this is temperature 0.7, keeping 4 maps of 5)."""
    from checkpoints import load_classifier
    from data import normalize
    pretrained = os.path.join(REPO, "models", "pretrained")
    run("generate.py", "--model", os.path.join(pretrained, "vqvae_mnist.pt"), "--input", "prior",
        "--prior-model", os.path.join(pretrained, "prior_mnist.pt"), "--digit", "3",
        "--temperature", "0.7", "--keep", "0.8", "--num-samples", "50", "--samples-out", "threes.pt",
        "--filename", "threes", cwd=tmp_path)
    judge = load_classifier(os.path.join(pretrained, "classifier.pt"), "cpu")
    samples = torch.load(tmp_path / "threes.pt", weights_only=True)
    with torch.no_grad():
        digits = judge(normalize(samples[:, 0])).argmax(1)
    assert (digits == 3).float().mean() >= 0.96, digits.tolist()


@pytest.mark.parametrize("case", ["missing", "digit", "temperature", "other_k", "vqvae_as_prior",
                                  "guidance_without_null_label", "keep_without_null_label", "top_p",
                                  "guidance_interval", "per_digit_scales", "per_digit_negative",
                                  "samples_out_under_a_file", "samples_out_folder",
                                  "samples_out_exists", "keep_tiny", "too_many_samples"])
def test_generate_prior_rejects_bad_input(trained_prior, tmp_path, case):
    cwd, _ = trained_prior
    vqvae, prior = str(cwd / "models/tiny/best.pt"), str(cwd / "models/prior/best.pt")
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    if case in ("other_k", "guidance_without_null_label", "keep_without_null_label"):
        other = tmp_path / "other.pt"
        checkpoint = torch.load(prior, weights_only=True)
        if case == "other_k":
            checkpoint["model_config"]["k"] = 64
        else:  # as a prior trained with --label-dropout 0: ten class rows, no null label
            checkpoint["model_config"]["unconditional"] = False
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
        "keep_without_null_label": (["--prior-model", prior, "--guidance-scale", "1", "--keep",
                                     "0.5"], ["--keep 0.5", "--label-dropout"]),
        "top_p": (["--prior-model", prior, "--top-p", "1.5"], ["--top-p"]),
        "guidance_interval": (["--prior-model", prior, "--guidance-interval", "30", "20"],
                              ["--guidance-interval 30 20", "START < STOP"]),
        "per_digit_scales": (["--prior-model", prior, "--guidance-scale", "1.2,1.1"],
                             ["--guidance-scale", "ten comma-separated", "got 2"]),
        "per_digit_negative": (["--prior-model", prior, "--guidance-scale", "1,1,1,1,1,1,1,1,1,-2"],
                               ["--guidance-scale", ">= 0", "'-2'"]),
        "samples_out_under_a_file": (["--prior-model", prior, "--num-samples", "5", "--samples-out",
                                      "notes.txt/x.pt"], ["--samples-out", "is a file"]),
        "samples_out_folder": (["--prior-model", prior, "--num-samples", "5", "--samples-out", "."],
                               ["--samples-out", "is a folder"]),
        "samples_out_exists": (["--prior-model", prior, "--num-samples", "5", "--samples-out",
                                "notes.txt"], ["--samples-out notes.txt", "exists"]),
        "keep_tiny": (["--prior-model", prior, "--keep", "0.0001"],   # 10,000 draws per map kept
                      ["--keep", "from 0.05 to 1"]),
        "too_many_samples": (["--prior-model", prior, "--num-samples", "999999999999",
                              "--samples-out", "s.pt"], ["--num-samples", "1,000,000"]),
    }[case]
    result = run("generate.py", "--model", vqvae, "--input", "prior", *args, cwd=tmp_path,
                 check=False)
    assert_clean_failure(result, *words)
    assert not (tmp_path / "generatedImages").exists()  # refused before anything is drawn
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder"


def test_generate_guides_by_default_only_priors_that_can_be_guided(trained_prior, tmp_path,
                                                                  monkeypatch):
    """Without --guidance-scale and --keep: the measured defaults for a prior trained with label
    dropout (its 100 grid maps drawn from ceil(10 / keep) per digit), no guidance and every map
    kept for a conditional-only one, instead of an error."""
    import gated_pixelcnn
    from sampling import DEFAULT_GUIDANCE_SCALE, DEFAULT_KEEP
    cwd, _ = trained_prior
    prior = str(cwd / "models/prior/best.pt")
    checkpoint = torch.load(prior, weights_only=True)
    checkpoint["model_config"]["unconditional"] = False
    checkpoint["state_dict"]["class_embedding.weight"] = \
        checkpoint["state_dict"]["class_embedding.weight"][:10]
    save_checkpoint(str(tmp_path / "conditional.pt"), checkpoint)
    scales, drawn = [], []
    original = gated_pixelcnn.GatedPixelCNN.sample
    monkeypatch.setattr(gated_pixelcnn.GatedPixelCNN, "sample", lambda self, labels, **kw: (
        scales.append(kw["guidance_scale"]), drawn.append(len(labels)),
        original(self, labels, **kw))[2])
    for path in (prior, "conditional.pt"):
        run("generate.py", "--model", str(cwd / "models/tiny/best.pt"), "--input", "prior",
            "--prior-model", path, cwd=tmp_path)
    assert scales == [DEFAULT_GUIDANCE_SCALE, 1.0]
    assert drawn == [10 * math.ceil(10 / DEFAULT_KEEP), 100]


@pytest.mark.parametrize("count, per_row", [(100, 10), (16, 8), (5, 2), (3, 8)])
def test_grids_are_torchvisions_layout_pixel_for_pixel(count, per_row, tmp_path):
    """image_grids draws what torchvision's make_grid / save_image drew before (without importing
    torchvision at start-up): the same pixels, in the TensorBoard grid and in the PNG file."""
    from torchvision.utils import make_grid, save_image
    from image_grids import image_grid, save_grid
    images = torch.rand(count, 1, 28, 28) * 2.2 - 1.1   # also outside [-1, 1]: clamped
    expected = make_grid(images, nrow=per_row, value_range=(-1, 1), normalize=True)
    assert torch.equal(image_grid(images, per_row), expected)
    save_image(images, tmp_path / "torchvision.png", nrow=per_row, normalize=True,
               value_range=(-1, 1))
    save_grid(images, str(tmp_path / "ours.png"), nrow=per_row)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "torchvision.png")),
                          np.asarray(Image.open(tmp_path / "ours.png")))


def test_a_prior_with_another_vqvae_is_warned_about(tmp_path):
    """The committed prior names the VQ-VAE it was trained over (found in this repo wherever it
    was trained): the same weights draw quietly, other weights of the same K get a warning."""
    prior = os.path.join(REPO, "models", "pretrained", "prior_mnist.pt")
    checkpoint = torch.load(PRETRAINED_VQVAE, weights_only=True)
    checkpoint["state_dict"]["decoder.3.weight"] *= 1.01
    torch.save(checkpoint, tmp_path / "retrained.pt")
    shutil.copy(PRETRAINED_VQVAE, tmp_path / "copy.pt")
    for vqvae, warned in (("copy.pt", False), ("retrained.pt", True)):
        result = run("generate.py", "--model", vqvae, "--input", "prior", "--prior-model", prior,
                     "--filename", vqvae, cwd=tmp_path)
        assert ("warning: --prior-model" in result.stderr) == warned, result.stderr
        assert "unlikely to be digits" in result.stderr or not warned
