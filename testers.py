"""The tests of vector_quantizer.py, in the original repo's style (its own tests come first, as
it wrote them). Everything else is tested in tests/, a file per concern; README's test command runs
both: `python -m pytest -q testers.py tests`."""
import numpy as np
import pytest
import torch

from vector_quantizer import VQEmbedding, rotate_to_codes, vq, vq_st


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
        indices = quantizer.quantize(inputs.view(4, 8, 1, 1)).indices
    assert indices.flatten().tolist() == [1, 1, 1, 1]
    assert quantizer.cluster_size.dtype == quantizer.embed_avg.dtype == torch.float32


def test_ema_update_matches_hand_computation():
    quantizer = VQEmbedding(2, 1, codebook="ema", decay=0.5, eps=1e-5)
    quantizer.embedding.weight.data = torch.tensor([[0.0], [10.0]])
    quantizer.embed_avg.copy_(quantizer.embedding.weight.data)
    z_e_x = torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 1, 3)               # (B, D, H, W)
    indices = quantizer.quantize(z_e_x).indices
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
