"""The priors over code maps (gated_pixelcnn.py, code_transformer.py, priors.py), their sampler
(sampling.py) and their trainer (pixelcnn_prior.py)."""
import copy
import os
import shutil

import pytest
import torch

from checkpoints import load_checkpoint, load_prior, load_state, load_vqvae, save_checkpoint
from code_transformer import CodeTransformer, CodeTransformerConfig
from conftest import assert_clean_failure, assert_same_weights, prior_flags, run
from data import MNISTSplit
from gated_pixelcnn import GatedPixelCNN, GatedPixelCNNConfig
from priors import prior_from_config


def small(arch, **options):
    """A small prior of either arch (16 codes, width 8), with `options` in its config."""
    if arch == "transformer":
        return CodeTransformer(CodeTransformerConfig(**{"k": 16, "width": 8, "num_layers": 2,
                                                        "heads": 2, **options}))
    return GatedPixelCNN(GatedPixelCNNConfig(**{"k": 16, "channels": 8, "num_layers": 3,
                                               **options}))


def assert_causal_without_blind_spot(prior, K, blind_spot_check=True):
    """The logits at (i, j) depend on no code from (i, j) on in raster order, and (unless saturated
    weights zero some gradients) on every code before it."""
    x = prior.embedding(torch.randint(K, (1, 7, 7))).permute(0, 3, 1, 2).detach().requires_grad_()
    biases = prior.conditioning(torch.tensor([3])).chunk(len(prior.layers), dim=1)
    logits = prior.output(prior.stacks_embedded(x, biases))               # (1, K, 7, 7)
    raster = torch.arange(49).view(7, 7)
    for i in range(7):
        for j in range(7):
            grad, = torch.autograd.grad(logits[0, :, i, j].sum(), x, retain_graph=True)
            influences = grad[0].abs().sum(0) > 0                         # (7, 7)
            assert not influences[raster >= 7 * i + j].any(), (i, j)
            assert not blind_spot_check or influences[raster < 7 * i + j].all(), (i, j)


def test_prior_is_causal_without_blind_spot():
    torch.manual_seed(0)
    assert_causal_without_blind_spot(small("gated_pixelcnn", num_layers=6), 16)


def test_prior_stays_causal_after_copy_training_and_device_moves():
    """Causal by construction: a deep copy (as an EMA of the weights makes) trained with Adam, and
    a move to another device type and back with every weight drawn anew, still see no future code."""
    torch.manual_seed(0)
    prior = copy.deepcopy(small("gated_pixelcnn"))
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
    torch.manual_seed(0)
    prior = small(arch, num_layers=4, dropout=0.1, unconditional=True).eval()
    for parameter in prior.parameters():   # weights far from init, so that any cache slip shows
        torch.nn.init.normal_(parameter, std=0.5)
    codes = torch.randint(16, (2, 7, 7))
    with torch.no_grad():
        assert not torch.allclose(prior(codes, torch.tensor([0, 0])), prior(codes, torch.tensor([0, 7])))
        labels = torch.tensor([0, 3, 7, 9, 10])          # 10: the null label, no digit
        # the cached sampler's logits at every position are the full forward pass's
        sampled, logits, evidence = prior.sample(labels, return_details=True)
        torch.testing.assert_close(logits, prior(sampled, labels), atol=1e-4, rtol=1e-4)
        # the evidence: log p(codes | label) - log p(codes | no digit), summed over the 49 codes
        def evidence_of(codes, labels):
            log_p = lambda y: prior(codes, y).log_softmax(1).gather(1, codes[:, None]).sum((1, 2, 3))  # noqa: E731
            return log_p(labels) - log_p(torch.full_like(labels, 10))
        torch.testing.assert_close(evidence, evidence_of(sampled, labels), atol=1e-3, rtol=1e-4)
        # guided: u + s (c - u), the unconditional half run in the same batch
        labels = labels[:4]
        sampled, logits, evidence = prior.sample(labels, guidance_scale=2.5, return_details=True)
        u, c = prior(sampled, torch.full_like(labels, 10)), prior(sampled, labels)
        torch.testing.assert_close(logits, u + 2.5 * (c - u), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(evidence, evidence_of(sampled, labels), atol=1e-3, rtol=1e-4)
        # guided on raster positions 0-19 only: the conditional logits alone after them
        sampled, logits, _ = prior.sample(labels, guidance_scale=2.5, guidance_interval=(0, 20),
                                          return_details=True)
        u, c = prior(sampled, torch.full_like(labels, 10)), prior(sampled, labels)
        guided = (u + 2.5 * (c - u)).flatten(2)
        torch.testing.assert_close(logits.flatten(2)[..., :20], guided[..., :20], atol=1e-4,
                                   rtol=1e-4)
        torch.testing.assert_close(logits.flatten(2)[..., 20:], c.flatten(2)[..., 20:], atol=1e-4,
                                   rtol=1e-4)
        greedy = prior.sample(labels, temperature=1e-6)
        assert torch.equal(prior(greedy, labels).argmax(1), greedy)
    with pytest.raises(ValueError, match="label dropout"):
        small(arch, unconditional=False).sample(labels, guidance_scale=2.0)


def test_transformer_prior_is_causal():
    """Changing code t changes the transformer's logits at positions after t only."""
    torch.manual_seed(0)
    prior = small("transformer").eval()
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
        "transformer", "--num-layers", "2", "--channels", "16", "--heads", "2", "--hold-out", "128",
        "--output-folder", "prior_transformer", cwd=cwd)
    prior = load_prior(str(cwd / "models/prior_transformer/best.pt"), "cpu", 32)
    assert type(prior).__name__ == "CodeTransformer" and prior.null_label == 10
    run("generate.py", "--model", "models/tiny/best.pt", "--input", "prior", "--prior-model",
        "models/prior_transformer/best.pt", "--guidance-scale", "2", "--filename", "transformer",
        cwd=cwd)
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


@pytest.mark.parametrize("arch", ["gated_pixelcnn", "transformer"])
def test_keep_rejects_the_maps_with_the_least_evidence_for_their_digit(arch):
    """sample_codes(keep=F): ceil(n / F) maps drawn per digit, the n of most evidence kept (each
    digit's count as asked); keep=1 is the plain sampler, draw for draw."""
    from sampling import sample_codes
    torch.manual_seed(0)
    prior = small(arch, num_layers=2, unconditional=True).eval()
    for parameter in prior.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    labels = torch.tensor([3, 3, 3, 3, 7, 7, 0, 3])
    with torch.no_grad():
        torch.manual_seed(1)
        plain = prior.sample(labels, guidance_scale=1.5)
        torch.manual_seed(1)
        assert torch.equal(sample_codes(prior, labels, keep=1.0, guidance_scale=1.5), plain)
        torch.manual_seed(1)
        kept = sample_codes(prior, labels, keep=0.5, guidance_scale=1.5, batch_size=7)
        torch.manual_seed(1)  # what it drew, digit by digit (0, 3, 7), in batches of 7
        drawn_labels = torch.tensor([0, 0] + [3] * 10 + [7] * 4)
        drawn = [prior.sample(y, guidance_scale=1.5, return_details=True)
                 for y in drawn_labels.split(7)]
    codes, evidence = torch.cat([d.codes for d in drawn]), torch.cat([d.evidence for d in drawn])
    for digit in (0, 3, 7):
        candidates = (drawn_labels == digit).nonzero()[:, 0]
        n = int((labels == digit).sum())
        best = candidates[evidence[candidates].topk(n).indices.sort().values]
        assert torch.equal(kept[labels == digit], codes[best])
        dropped = candidates[~torch.isin(candidates, best)]
        assert len(dropped) == len(candidates) - n and evidence[best].min() >= evidence[dropped].max()
    assert not torch.equal(kept, plain)


@pytest.mark.parametrize("arch", ["gated_pixelcnn", "transformer"])
def test_per_digit_guidance_guides_each_row_by_its_digits_scale(arch):
    """A per-digit guidance scale (--guidance-scale S0,...,S9): each row's logits u + s_d (c - u) with
    its digit's s_d; rows of digits whose scale is the uniform one draw exactly what the uniform
    scale draws, and ten equal scales are that scale."""
    from sampling import per_row, sample_codes
    torch.manual_seed(0)
    prior = small(arch, num_layers=2, unconditional=True).eval()
    for parameter in prior.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    labels = torch.tensor([3, 7, 7, 0, 3, 7])
    scales = (1.5,) * 7 + (3.0,) + (1.5,) * 2       # digit 7 guided harder
    with torch.no_grad():
        sampled, logits, _ = prior.sample(labels, guidance_scale=per_row(scales, labels),
                                          return_details=True)
        u, c = prior(sampled, torch.full_like(labels, 10)), prior(sampled, labels)
        s = torch.tensor([1.5, 3.0, 3.0, 1.5, 1.5, 3.0])[:, None, None, None]
        torch.testing.assert_close(logits, u + s * (c - u), atol=1e-4, rtol=1e-4)
        drawn = {}
        for name, scale in (("uniform", 1.5), ("ten equal", (1.5,) * 10), ("per digit", scales)):
            torch.manual_seed(1)
            drawn[name] = sample_codes(prior, labels, guidance_scale=scale, batch_size=4)
    assert torch.equal(drawn["ten equal"], drawn["uniform"])
    other = labels != 7
    assert torch.equal(drawn["per digit"][other], drawn["uniform"][other])
    assert not torch.equal(drawn["per digit"][~other], drawn["uniform"][~other])


def test_guidance_scale_flag_reads_one_scale_or_ten():
    """Ten equal scales are that one scale (so ten 1s need no unconditional half); one or ten
    values, each >= 0, else argparse's one-line error."""
    import argparse
    from sampling import guidance_scale, per_row
    assert guidance_scale("1.5") == 1.5 and guidance_scale(",".join(["1"] * 10)) == 1.0
    assert guidance_scale("1,2,1,1,1,1,1,1,1,1.5") == (1, 2, 1, 1, 1, 1, 1, 1, 1, 1.5)
    assert per_row((1.0,) * 10, torch.tensor([3, 4])) == 1.0
    for bad in ("1,2", "1,1,1,1,1,1,1,1,1,-1", "1,1,1,1,1,1,1,1,1,1,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            guidance_scale(bad)


def test_prior_ema_follows_the_weights():
    from pixelcnn_prior import update_ema
    prior, average = small("gated_pixelcnn"), small("gated_pixelcnn")
    before = [p.clone() for p in average.parameters()]
    update_ema(average, prior, 0.999, step=0)         # step 0: decay ramps to 0.1
    for p, b, w in zip(average.parameters(), before, prior.parameters()):
        torch.testing.assert_close(p, b + 0.9 * (w - b))
    for step in range(1, 3000):
        update_ema(average, prior, 0.999, step)
    for p, w in zip(average.parameters(), prior.parameters()):
        torch.testing.assert_close(p, w, atol=1e-3, rtol=0)


def test_prior_training_lowers_nll(trained_prior):
    cwd, result = trained_prior
    checkpoint = load_checkpoint(str(cwd / "models" / "prior" / "last.pt"), "prior")
    assert checkpoint["model_config"]["k"] == 32 and checkpoint["epoch"] == 2
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    held_out = [float(line.split("held-out ")[1].split(",")[0]) for line in epochs]
    test = [float(line.split("test ")[1].split()[0]) for line in epochs]
    for bits in (held_out, test):
        assert len(bits) == 2 and bits[1] < bits[0] < 49 * 5  # under the uniform bound 49 log2 32
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(cwd / "logs" / "prior")).Reload()
    assert {"loss/test/nll_nats_per_map", "loss/test/bits_per_code", "loss/held_out/bits_per_code",
            "loss/test/bits_per_code_without_ema"} <= set(events.Tags()["scalars"])
    # best.pt: the epoch of lowest held-out NLL (the test maps only report)
    best = load_checkpoint(str(cwd / "models" / "prior" / "best.pt"), "prior")
    assert best["metrics"]["held_out_bits_per_map"] == pytest.approx(min(held_out), abs=0.05)
    # by default the checkpoint samples with the weights' moving average, keeps the weights to
    # resume, and the prior learned the null label (label dropout) that guidance needs
    average, weights = checkpoint["state_dict"], checkpoint["training_state_dict"]
    assert average.keys() == weights.keys()
    assert not torch.equal(average["embedding.weight"], weights["embedding.weight"])
    prior = load_prior(str(cwd / "models" / "prior" / "best.pt"), "cpu", 32)
    assert prior.null_label == 10
    torch.testing.assert_close(prior.state_dict()["class_embedding.weight"],
                               best["state_dict"]["class_embedding.weight"])


def test_prior_resume_is_bit_identical(trained_prior, trained_run, tmp_path, data_folder):
    """A 1-epoch run resumed to 2 epochs equals the shared 2-epoch prior (at a constant learning
    rate: a cosine schedule spans the epochs the run was started with). The resume may name its
    VQ-VAE at another path, not another VQ-VAE (whose codes the prior never learned)."""
    cwd, _ = trained_prior
    flags = prior_flags(trained_run, data_folder)
    run("pixelcnn_prior.py", *flags, "--num-epochs", "1", "--output-folder", "prior", cwd=tmp_path)
    vqvae_runs = cwd / "models" / "tiny"
    resume = ["pixelcnn_prior.py", "--resume", "models/prior/last.pt", "--num-epochs", "2",
              "--data-folder", data_folder]
    result = run(*resume, "--vqvae-model", vqvae_runs / "model_1.pt", cwd=tmp_path, check=False)
    assert_clean_failure(result, "model_1.pt", "weights differ")
    shutil.copy(vqvae_runs / "best.pt", tmp_path / "moved.pt")
    run(*resume, "--vqvae-model", "moved.pt", cwd=tmp_path)
    assert_same_weights(cwd / "models" / "prior" / "last.pt", tmp_path / "models" / "prior" / "last.pt")


def test_prior_run_from_before_the_new_flags_resumes_without_them(trained_prior, tmp_path):
    """A last.pt written before model configs and before --dropout/--label-dropout/--ema-decay/
    --arch/--hold-out existed (one "config": the command line, where --hidden-size was the
    channels) loads as the prior it is and resumes as the run it was: a Gated PixelCNN with ten
    class rows, no dropout, no average, trained on every training map."""
    import pixelcnn_prior
    cwd, _ = trained_prior
    checkpoint = torch.load(cwd / "models" / "prior" / "last.pt", weights_only=True)
    config = {**checkpoint.pop("run_config"), "k": 32}
    config["hidden_size"] = config.pop("channels")
    for key in pixelcnn_prior.BEFORE_FLAGS:
        del config[key]
    del checkpoint["model_config"]
    state_dict = checkpoint.pop("training_state_dict")
    state_dict["class_embedding.weight"] = state_dict["class_embedding.weight"][:10]
    checkpoint.update(config=config, state_dict=state_dict,
                      best_nll=checkpoint.pop("best_score"))
    save_checkpoint(str(tmp_path / "old.pt"), checkpoint)
    prior = load_prior(str(tmp_path / "old.pt"), "cpu", 32)
    assert prior.null_label is None and prior.embedding.embedding_dim == 32
    args, resumed = pixelcnn_prior.parse_args(["--resume", str(tmp_path / "old.pt")])
    assert (args.arch, args.dropout, args.label_dropout, args.ema_decay, args.hold_out) == \
        ("gated_pixelcnn", 0.0, 0.0, 0.0, 0)
    assert args.channels == 32
    model = prior_from_config(pixelcnn_prior.model_config(args, 32))
    load_state(model, resumed["state_dict"], "--resume", "old.pt")


def test_the_priors_old_hidden_size_flag_names_its_new_name(tmp_path):
    """--hidden-size was the prior's channels; a prefix must not make it --hidden-size-vae."""
    result = run("pixelcnn_prior.py", "--vqvae-model", "x.pt", "--hidden-size", "64", cwd=tmp_path,
                 check=False)
    assert_clean_failure(result, "--hidden-size", "--channels 64")


def test_shift_augment_trains_on_every_shift_told_which_and_scores_the_unshifted(trained_run,
                                                                                  data_folder):
    """--shift-augment 1: every training map is drawn from one of the 9 shifts of its image, each
    with its own shift label (every row of the shift embedding moves from zero); NLLs, samples and
    generate.py are the unshifted maps' (shift 0, what forward takes without shifts)."""
    import pixelcnn_prior
    cwd, _ = trained_run
    shifts = pixelcnn_prior.pixel_shifts(1)
    assert shifts[0] == (0, 0) and len(set(shifts)) == 9 and max(map(max, shifts)) == 1
    vqvae, _ = load_vqvae(str(cwd / "models/tiny/best.pt"), "cpu")
    split = MNISTSplit(data_folder, True, "cpu", limit=128)
    images, _ = next(split.batches(128))
    shifted, _ = pixelcnn_prior.extract_codes(vqvae, split, (1, -1))
    assert torch.equal(shifted, vqvae.encode(images.roll((1, -1), dims=(2, 3))))
    assert not torch.equal(shifted, pixelcnn_prior.extract_codes(vqvae, split)[0])

    run("pixelcnn_prior.py", "--vqvae-model", "models/tiny/best.pt", "--data-folder", data_folder,
        "--train-subset", "512", "--test-subset", "128", "--num-epochs", "1", "--num-layers", "2",
        "--channels", "16", "--hold-out", "128", "--shift-augment", "1", "--output-folder",
        "prior_shifted", cwd=cwd)
    prior = load_prior(str(cwd / "models/prior_shifted/best.pt"), "cpu", 32)
    rows = prior.shift_embedding.weight
    assert rows.shape[0] == 9 and (rows.abs().sum(1) > 0).all()
    codes, labels = torch.randint(32, (2, 7, 7)), torch.tensor([3, 10])
    with torch.no_grad():
        unshifted = prior(codes, labels)
        torch.testing.assert_close(unshifted, prior(codes, labels, torch.zeros(2, dtype=torch.long)))
        assert not torch.allclose(unshifted, prior(codes, labels, torch.ones(2, dtype=torch.long)))
    run("generate.py", "--model", "models/tiny/best.pt", "--input", "prior", "--prior-model",
        "models/prior_shifted/best.pt", "--filename", "shifted", cwd=cwd)
    assert (cwd / "generatedImages" / "shifted.png").exists()


@pytest.mark.parametrize("flags, words", [
    (["--shift-augment", "4"], ["--shift-augment 4", "at most 3"]),
    (["--shift-augment", "1", "--arch", "transformer"], ["--shift-augment 1", "Gated PixelCNN"]),
])
def test_bad_shift_augment_is_one_line(flags, words, tmp_path):
    result = run("pixelcnn_prior.py", "--vqvae-model", "x.pt", *flags, cwd=tmp_path, check=False)
    assert_clean_failure(result, *words)
    assert os.listdir(tmp_path) == []
