"""The judges of generated digits: classifier.py's two committed classifiers and sample_quality.py."""
import json
import os

import pytest
import torch

from conftest import REPO, run
from data import MNISTSplit


def test_sample_quality_reports_every_source(trained_prior, data_folder):
    cwd, _ = trained_prior
    result = run("sample_quality.py", "--model", "models/tiny/best.pt", "--prior-model",
                 "models/prior/best.pt", "--num-samples", "200", "--guidance-scales", "1", "3",
                 "--data-folder", data_folder, "--test-subset", "1000", "--json", cwd=cwd)
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
    prior samples (generate.py's default sampler) are read as the digits asked for (README: 99%
    and more; here at least 97% of 200, three binomial standard deviations below) and lie far
    closer to real digits than uniformly drawn codes."""
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
            assert figures["agreement"] >= 0.97, (name, source, figures)
            assert figures["frechet_distance"] < uniform / 10, (name, source, figures, uniform)
