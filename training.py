"""The VQ-VAE's training step and everything it is made of: the objective (paper eq. 3), the
optimizer and learning-rate schedule, the --amp precision, torch.compile, code-usage statistics and
the test-set evaluation."""

import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cli import fail
from vector_quantizer import count_codes


class VQVAELosses(NamedTuple):
    """The terms of the VQ-VAE objective on one batch (scalar tensors), and the codes chosen."""
    loss: torch.Tensor             # what is minimised
    reconstruction: torch.Tensor   # ||x - x~||^2
    quantization: torch.Tensor     # the quantizer's own distance to its codes (`Quantized.error`)
    terms: dict                    # the quantizer's auxiliary losses by name, unweighted: for 'vq',
                                   # commitment ||z_e(x) - sg[e]||^2 and (loss codebook) codebook
                                   # ||sg[z_e(x)] - e||^2; for 'lfq' also entropy
    indices: torch.Tensor          # (B, 7, 7)


def loss_weights(beta, entropy_weight=0.1):
    """The weight of each auxiliary loss a quantizer may return: the paper's eq. 3 puts 1 on the
    codebook term and beta on the commitment; LFQ's entropy term has its own weight."""
    return {"codebook": 1.0, "commitment": beta, "entropy": entropy_weight}


def vqvae_losses(model, images, weights):
    """The VQ-VAE objective on one batch -> VQVAELosses: loss = reconstruction + the sum of the
    quantizer's auxiliary losses, each times `weights[name]` (`loss_weights`). For 'vq' that is eq. 3,
    reconstruction + codebook + beta * commitment; an EMA codebook returns no codebook term, since
    its update moves the codewords."""
    x_tilde, quantized = model(images, return_quantized=True)
    reconstruction = F.mse_loss(x_tilde.float(), images)
    loss = reconstruction
    for name, term in quantized.losses.items():
        loss = loss + weights[name] * term
    return VQVAELosses(loss, reconstruction, quantized.error, quantized.losses, quantized.indices)


def make_optimizer(model, lr, device):
    """Adam over the trainable parameters (an EMA codebook is not one); fused kernels on CUDA."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                            fused=torch.device(device).type == "cuda")


LR_SCHEDULES = ("constant", "cosine")
COMPILE_MODES = ("default", "reduce-overhead")


def make_scheduler(optimizer, schedule, total_steps):
    """None for a constant rate; 'cosine' decays it to 0 over `total_steps` optimizer steps."""
    if schedule == "constant":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(total_steps, 1))


def add_compile_flags(parser, mode_help):
    """--compile and --compile-mode, as VQ-VAE.py and benchmark.py both take them."""
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default", help=mode_help)


def check_compile_flags(args, typed):
    """A typed --compile-mode without --compile would be silently ignored: refuse it (exit 2)."""
    if "compile_mode" in typed and not args.compile:
        fail(f"--compile-mode {args.compile_mode} applies with --compile, which was not given")


def maybe_compile(model, device, mode="default"):
    """torch.compile(model, mode=mode), or the eager model with a warning where compiling cannot
    work here (no C++ compiler for CPU kernels, no Triton for GPU ones): a tiny function is compiled
    first, since torch.compile itself only fails at the first call. Mode "reduce-overhead" also
    replays the compiled step as CUDA graphs on a GPU (on a CPU it compiles as "default"): at batch
    128 an H200 waits on kernel launches (README "GPUs and"). A replay overwrites the previous
    step's outputs, which every caller of train_step has copied (stacked) or dropped by then."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))
        return torch.compile(model, mode=mode)
    except Exception as e:
        print(f"warning: --compile unavailable here ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); training eagerly", file=sys.stderr)
        return model


def amp_precision(device_type, capability=None, cpu_bf16=False):
    """What --amp runs in, as a pure function of the hardware -> (autocast dtype or None for float32,
    whether a GradScaler is needed). bf16 keeps float32's range, so it needs no loss scaling, but only
    GPUs of compute capability 8.0+ (A100, RTX 30xx, H100, H200) and CPUs with AVX512-BF16 or AMX run
    it natively; older GPUs (T4 sm_75, V100 sm_70) get fp16, whose small range needs a GradScaler;
    other CPUs stay in float32."""
    if device_type == "cuda":
        return (torch.bfloat16, False) if capability >= (8, 0) else (torch.float16, True)
    return (torch.bfloat16, False) if cpu_bf16 else (None, False)


def cpu_has_native_bf16():
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# torch 2.2 has only the CUDA-specific class; fp16 (the only user of a scaler) is CUDA-only here.
GradScaler = getattr(torch.amp, "GradScaler", None) or torch.cuda.amp.GradScaler


def make_precision(device, amp):
    """--amp on `device` -> (autocast dtype or None, a GradScaler: disabled unless fp16 needs it),
    with a one-line warning where --amp falls back to float32."""
    device = torch.device(device)
    dtype, scaled = None, False
    if amp:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        dtype, scaled = amp_precision(device.type, capability, cpu_has_native_bf16())
        if dtype is None:
            print("warning: --amp: this CPU has no native bf16 (AVX512-BF16 or AMX); training in "
                  "float32", file=sys.stderr)
    return dtype, GradScaler(enabled=scaled)


def train_step(model, optimizer, scaler, images, weights, amp_dtype=None):
    """One optimisation step, under autocast to `amp_dtype` when given -> its VQVAELosses,
    detached; `weights`: the auxiliary losses' (`loss_weights`). `scaler` scales the loss for
    fp16 (a disabled one passes everything through).

    The codebook's training-time updates (k-means init on the first batch, the EMA statistics,
    dead-code restarts) run in the forward pass, in `VQEmbedding.quantize`, whenever the model is in
    training mode: they need this batch's encoder outputs, which only the forward pass has."""
    with torch.autocast(images.device.type, amp_dtype or torch.bfloat16,
                        enabled=amp_dtype is not None):
        losses = vqvae_losses(model, images, weights)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses.loss).backward()
    scaler.step(optimizer)  # with fused Adam the inf check stays on the device: no host sync
    scaler.update()
    return losses._replace(loss=losses.loss.detach(), reconstruction=losses.reconstruction.detach(),
                           quantization=losses.quantization.detach(),
                           terms={name: term.detach() for name, term in losses.terms.items()})


def perplexity(counts):
    """exp(H(p)) of a code histogram counts (K,): K when all codes are used equally, 1 at collapse."""
    p = counts / counts.sum()
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())


def code_usage(indices, K):
    """indices (any shape) -> (counts (K,), perplexity, codes used), all device tensors."""
    counts = count_codes(indices, K)
    return counts, perplexity(counts), (counts > 0).sum()


def step_scalar_tags(loss_names):
    """The TensorBoard tags VQ-VAE.py logs every step, in `step_scalars`' order; `loss_names`: the
    quantizer's own loss terms."""
    return ("loss/train/training_loss", "loss/train/reconstruction", "loss/train/quantization",
            *(f"loss/train/{name}" for name in loss_names),
            "codebook/train/perplexity", "codebook/train/codes_used")


def step_scalars(losses, K, loss_names):
    """`train_step`'s losses -> one step's figures (len(`step_scalar_tags`),), still on the device:
    read back only every --log-every steps, so the step itself never waits for the host."""
    _, perplexity, used = code_usage(losses.indices, K)
    return torch.stack([losses.loss, losses.reconstruction, losses.quantization,
                        *(losses.terms[name] for name in loss_names), perplexity, used.float()])


@torch.no_grad()
def evaluate_vqvae(model, split, batch_size=500):
    """Eval-mode pass over a whole split -> dict of floats: reconstruction (MSE on [-1, 1]),
    quantization (the quantizer's `Quantized.error`), perplexity, codes_used, and counts (K,) as a
    CPU tensor."""
    was_training = model.training
    model.eval()
    K = model.codeBook.K
    sums = torch.zeros(2, dtype=torch.float64, device=split.device)
    counts = torch.zeros(K, device=split.device)
    for images, _ in split.batches(batch_size):
        x_tilde, quantized = model(images, return_quantized=True)
        sums[0] += F.mse_loss(x_tilde.float(), images, reduction="sum")
        sums[1] += quantized.error * len(images)
        counts += count_codes(quantized.indices, K)
    model.train(was_training)
    n = len(split)
    reconstruction, quantization = (sums / torch.tensor([n * 28 * 28, n], device=sums.device)).tolist()
    return {"reconstruction": reconstruction, "quantization": quantization,
            "perplexity": perplexity(counts).item(), "codes_used": int((counts > 0).sum()),
            "counts": counts.cpu()}
