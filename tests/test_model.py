"""The VQ-VAE's networks and training step (modules.py, training.py): shapes, init, losses by name,
the codebook options at work in the model, and a step that is the same on every device."""
import numpy as np
import pytest
import torch

from data import MNISTSplit
from modules import ORIGINAL_CONFIG, VQVAEConfig, VectorQuantizedVAE, vqvae_from_config
from training import VQVAELosses, loss_weights, vqvae_losses
from vector_quantizer import QUANTIZERS, VQEmbedding, kmeans, vq


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


def test_the_original_modules_names_import_from_modules():
    """Code written against the original repo imports its quantizer and helpers from modules.py."""
    import modules
    import vector_quantizer
    for name in ("VQEmbedding", "vq", "vq_st"):
        assert getattr(modules, name) is getattr(vector_quantizer, name)
    assert modules.to_scalar(torch.tensor(2.5)) == 2.5
    assert modules.to_scalar([torch.tensor(1), torch.tensor(2.0)]) == [1, 2.0]
    # The original's VQEmbedding.straight_through: the codewords forward, the identity backward
    codebook = modules.VQEmbedding(8, 4)
    z_e_x = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q_x_st, z_q_x = codebook.straight_through(z_e_x)
    assert torch.equal(z_q_x_st, z_q_x) and torch.equal(
        z_q_x, codebook.embedding.weight[codebook(z_e_x)].permute(0, 3, 1, 2))
    z_q_x_st.sum().backward()
    assert torch.equal(z_e_x.grad, torch.ones_like(z_e_x))


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
    # In training mode (batch statistics) the scaled network is the original's, with z_e(x) halved.
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


def test_short_training_run_lowers_loss(data_folder):
    torch.manual_seed(0)
    split = MNISTSplit(data_folder, True, "cpu", limit=2048)
    model = VectorQuantizedVAE(1, 16, 32, codebook="loss")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        for images, _ in split.batches(128, torch.randperm(len(split))):
            terms = vqvae_losses(model, images, loss_weights(1.0))
            optimizer.zero_grad()
            terms.loss.backward()
            optimizer.step()
            losses.append([terms.loss.item(), terms.reconstruction.item()])
    first, last = np.mean(losses[:5], axis=0), np.mean(losses[-5:], axis=0)
    assert (last < 0.9 * first).all() and last[1] < 0.6 * first[1], (first, last)


def test_losses_are_returned_by_name_and_add_up_as_in_the_paper():
    torch.manual_seed(0)
    images = torch.rand(4, 1, 28, 28) * 2 - 1
    for codebook in ("loss", "ema"):
        model = VectorQuantizedVAE(1, 8, 16, codebook=codebook)
        terms = vqvae_losses(model, images, loss_weights(beta=0.25))
        assert isinstance(terms, VQVAELosses) and terms.indices.shape == (4, 7, 7)
        learned = codebook == "loss"
        assert set(terms.terms) == ({"commitment", "codebook"} if learned else {"commitment"})
        expected = terms.reconstruction + 0.25 * terms.terms["commitment"] + \
            learned * terms.quantization
        torch.testing.assert_close(terms.loss, expected)
        assert terms.quantization > 0 and terms.terms["commitment"] > 0


def test_rotation_gradient_option_trains_with_its_own_gradient(data_folder):
    """--gradient rotation: from the same weights and batch, the encoder gets another gradient
    than straight-through's (the option is in effect), and training still lowers the loss."""
    images, _ = next(MNISTSplit(data_folder, True, "cpu", limit=64).batches(64))
    encoder_gradients = {}
    for gradient in ("straight-through", "rotation"):
        torch.manual_seed(0)
        model = vqvae_from_config(VQVAEConfig(hidden_size=16, k=32, gradient=gradient))
        vqvae_losses(model, images, loss_weights(1.0)).reconstruction.backward()
        encoder_gradients[gradient] = model.encoder[0].weight.grad.clone()
    assert encoder_gradients["rotation"].abs().sum() > 0  # the decoder's gradient got through
    assert not torch.allclose(encoder_gradients["rotation"], encoder_gradients["straight-through"],
                              rtol=0.05)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    split = MNISTSplit(data_folder, True, "cpu", limit=512)
    losses = []
    for _ in range(3):
        for images, _ in split.batches(64):
            loss = vqvae_losses(model, images, loss_weights(1.0)).reconstruction
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-8:]) < 0.7 * sum(losses[:8])


def test_kmeans_init_beats_codewords_drawn_from_the_data(data_folder):
    """k-means on the first batch places the codewords better than the same number of encoder
    outputs drawn at random (the usual data-based init, which k-means starts from and improves)."""
    torch.manual_seed(0)
    model = VectorQuantizedVAE(1, 16, 64)
    images, _ = next(MNISTSplit(data_folder, True, "cpu", limit=256).batches(256))
    with torch.no_grad():
        flat = model.encoder(images).permute(0, 2, 3, 1).reshape(-1, 16)

    def error(codebook):
        return (flat - codebook[vq(flat, codebook)]).pow(2).sum(1).mean().item()
    drawn = np.mean([error(flat[torch.randperm(len(flat))[:64]]) for _ in range(3)])
    assert error(kmeans(flat, 64)) < 0.85 * drawn
    quantizer = VQEmbedding(64, 16, init="kmeans")
    assert not bool(quantizer.initialized)
    quantizer.quantize(flat.t().reshape(1, 16, -1, 1))
    assert bool(quantizer.initialized)
    assert error(quantizer.embedding.weight.detach()) < 0.85 * drawn


def test_configs_build_the_models_they_name():
    """The defaults are VQ-VAE.py's; ORIGINAL_CONFIG is the original repo's model."""
    model = vqvae_from_config(VQVAEConfig())
    assert (model.codeBook.K, model.codeBook.embedding.embedding_dim) == (512, 40)
    assert model.codeBook.codebook == "ema" and model.codeBook.dead_code_threshold == 6.0
    seed = vqvae_from_config(ORIGINAL_CONFIG)
    assert seed.codeBook.codebook == "loss" and seed.codeBook.dead_code_threshold == 0.0
    torch.manual_seed(0)
    original = VectorQuantizedVAE(1, 40, 512)
    torch.manual_seed(0)
    for (name, a), b in zip(original.state_dict().items(), vqvae_from_config(ORIGINAL_CONFIG)
                            .state_dict().values()):
        assert torch.equal(a, b), name  # the original's constructor, the original's init


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_training_step_never_reads_a_value_back_to_the_host(data_folder, monkeypatch, quantizer):
    """On the meta device tensors have shapes but no values, so every op that needs a value on the
    host (.item(), bool(), torch.bincount, boolean masks, nonzero) raises there: a step that runs
    on meta, k-means init, EMA update, dead-code restart and code usage included, has no host sync
    on CUDA either. (Autocast knows no meta device; it is a no-op here.)"""
    import contextlib
    from training import make_optimizer, make_precision, make_scheduler, step_scalars, train_step
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: contextlib.nullcontext())
    split = MNISTSplit(data_folder, True, "meta", limit=256)
    model = vqvae_from_config(VQVAEConfig(quantizer=quantizer)).to("meta")
    optimizer = make_optimizer(model, 2e-4, "meta")
    scheduler = make_scheduler(optimizer, "cosine", 4)
    amp_dtype, scaler = make_precision("meta", False)
    pending = []
    for images, _ in split.batches(64, torch.randperm(256)):
        losses = train_step(model, optimizer, scaler, images, loss_weights(1.0), amp_dtype)
        scheduler.step()
        pending.append(step_scalars(losses, 512, model.codeBook.loss_names))
    assert len(pending) == 4 and torch.stack(pending).device.type == "meta"
    assert getattr(model.codeBook, "_needs_init", False) is False  # the k-means init ran too


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


@pytest.mark.parametrize("codebook", ["ema", "loss"])
def test_a_codeword_of_one_channel_trains(codebook):
    """--hidden-size 1: the (B, H, W, 1) codewords permuted to (B, 1, H, W) are already
    contiguous, and the decoder's in-place ReLU must still get its own copy."""
    model = VectorQuantizedVAE(1, 1, 16, codebook=codebook)
    x_tilde, _ = model(torch.randn(4, 1, 28, 28), return_quantized=True)
    x_tilde.sum().backward()
    assert model.encoder[0].weight.grad is not None
