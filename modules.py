"""The VQ-VAE model and the pieces every script shares: MNIST loading, safe checkpoints, CLI checks.

Model shapes (B images, D = --hidden-size, K = --k):
    x (B, 1, 28, 28) in [-1, 1] -> encoder -> z_e_x (B, D, 7, 7) -> codebook -> indices (B, 7, 7)
    -> z_q_x (B, D, 7, 7) -> decoder -> x_tilde (B, 1, 28, 28) in [-1, 1]
"""
import argparse
import glob
import gzip
import hashlib
import math
import os
import pickle
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import datasets, transforms

from vector_quantizer import VQEmbedding, count_codes

REPO_DIR = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------- model
def weights_init(m):
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_uniform_(m.weight.data)
        m.bias.data.fill_(0)


class ResBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(True),
            nn.Conv2d(dim, dim, 3, 1, 1),
            nn.BatchNorm2d(dim),
            nn.ReLU(True),
            nn.Conv2d(dim, dim, 1),
            nn.BatchNorm2d(dim),
        )

    def forward(self, x):
        return x + self.block(x)


class VectorQuantizedVAE(nn.Module):
    """The seed's network: 28x28 -> 7x7 by two 4x4 stride-2 convs and two residual blocks, mirrored
    in the decoder, which ends in Tanh. Codebook options are passed on to `VQEmbedding`."""

    def __init__(self, input_dim, dim, K=512, codebook="loss", codebook_init="uniform", decay=0.99,
                 dead_code_threshold=0.0, gradient="straight-through", conv_init_scale=1.0,
                 latent_init_scale=1.0):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(input_dim, dim, 4, 2, 1),
            nn.BatchNorm2d(dim),
            nn.ReLU(True),
            nn.Conv2d(dim, dim, 4, 2, 1),
            ResBlock(dim),
            ResBlock(dim),
        )
        self.codeBook = VQEmbedding(K, dim, codebook, codebook_init, decay, dead_code_threshold,
                                    gradient=gradient)
        self.decoder = nn.Sequential(
            ResBlock(dim),
            ResBlock(dim),
            nn.ReLU(True),
            nn.ConvTranspose2d(dim, dim, 4, 2, 1),
            nn.BatchNorm2d(dim),
            nn.ReLU(True),
            nn.ConvTranspose2d(dim, input_dim, 4, 2, 1),
            nn.Tanh(),
        )
        self.apply(weights_init)
        self._rescale_init(conv_init_scale, latent_init_scale)

    @torch.no_grad()
    def _rescale_init(self, conv_scale, latent_scale):
        """Multiply parts of the seed's Xavier init (1, 1: the seed's init). In training mode the
        network computes the same function afterwards, up to the factor `latent_scale` on z_e(x)."""
        # A conv followed by BatchNorm is scale-free: BatchNorm divides its scale out. Adam moves
        # every weight by ~lr per step whatever its size, so smaller weights turn faster: for these
        # layers the init scale sets the effective learning rate (about lr / |w|). The running
        # variance starts scaled alike, or eval mode would divide by a variance 1/scale^2 too large
        # until the EMA forgets its start (a short run's eval-mode codes collapsed onto 1-3 codes).
        for seq in self.modules():
            if isinstance(seq, nn.Sequential):
                for layer, following in zip(seq, seq[1:]):
                    if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and \
                            isinstance(following, nn.BatchNorm2d):
                        layer.weight.mul_(conv_scale)
                        following.running_var.mul_(conv_scale ** 2)
        # z_e(x) is the residual stream conv(h) + block_1 + block_2: scaling that conv's weights and
        # each block's last BatchNorm gain scales z_e(x). The commitment loss beta ||z_e - sg[e]||^2
        # is measured in these units, so a smaller latent is held less tightly at the same beta.
        self.encoder[3].weight.mul_(latent_scale)
        for block in self.encoder[4:]:
            block.block[-1].weight.mul_(latent_scale)

    def encode(self, x):
        """(B, 1, 28, 28) -> code indices (B, 7, 7)."""
        return self.codeBook(self.encoder(x))

    def decode(self, latents):
        """code indices (B, 7, 7) -> images (B, 1, 28, 28)."""
        z_q_x = self.codeBook.embedding(latents).permute(0, 3, 1, 2)     # (B, 7, 7, D) -> (B, D, 7, 7)
        return self.decoder(z_q_x)

    def forward(self, x, return_indices=False):
        """-> (x_tilde, z_e_x, z_q_x) as in the seed, plus indices (B, 7, 7) when asked."""
        z_e_x = self.encoder(x)
        z_q_x_st, z_q_x, indices = self.codeBook.quantize(z_e_x)
        x_tilde = self.decoder(z_q_x_st)
        return (x_tilde, z_e_x, z_q_x, indices) if return_indices else (x_tilde, z_e_x, z_q_x)


def vqvae_losses(model, images, beta, learned_codebook=True):
    """The VQ-VAE objective (paper eq. 3) on one batch -> (loss, reconstruction_loss, codebook_loss,
    commitment_loss, indices). `learned_codebook=False` (EMA codebook) leaves the codebook loss out of
    the total: the EMA update does its job. The codebook loss is still returned for logging."""
    x_tilde, z_e_x, z_q_x, indices = model(images, return_indices=True)
    reconstruction_loss = F.mse_loss(x_tilde.float(), images)
    codebook_loss = F.mse_loss(z_q_x.float(), z_e_x.detach().float())    # ||sg[z_e(x)] - e||^2
    commitment_loss = F.mse_loss(z_e_x.float(), z_q_x.detach().float())  # ||z_e(x) - sg[e]||^2
    loss = reconstruction_loss + beta * commitment_loss
    if learned_codebook:
        loss = loss + codebook_loss
    return loss, reconstruction_loss, codebook_loss, commitment_loss, indices


def make_optimizer(model, lr, device):
    """Adam over the trainable parameters (an EMA codebook is not one); fused kernels on CUDA."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                            fused=torch.device(device).type == "cuda")


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict, except that the kernel choice (fused, foreach, capturable) stays
    the one `optimizer` was built with for this device: a CPU checkpoint resumed on CUDA gets the
    fused kernels, a CUDA one resumed on a CPU leaves them."""
    kernels = {k: optimizer.defaults[k] for k in ("fused", "foreach", "capturable")
               if k in optimizer.defaults}
    optimizer.load_state_dict({**state, "param_groups": [{**group, **kernels}
                                                         for group in state["param_groups"]]})


LR_SCHEDULES = ("constant", "cosine")


def make_scheduler(optimizer, schedule, total_steps):
    """None for a constant rate; 'cosine' decays it to 0 over `total_steps` optimizer steps."""
    if schedule == "constant":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(total_steps, 1))


def maybe_compile(model, device):
    """torch.compile(model), or the eager model with a warning where compiling cannot work here (no
    C++ compiler for CPU kernels, no Triton for GPU ones): a tiny function is compiled first, since
    torch.compile itself only fails at the first call."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))
        return torch.compile(model)
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


def train_step(model, optimizer, scaler, images, beta, learned_codebook, amp_dtype=None):
    """One optimisation step, under autocast to `amp_dtype` when given -> the `vqvae_losses` tuple,
    detached. `scaler` scales the loss for fp16 (a disabled one passes everything through)."""
    with torch.autocast(images.device.type, amp_dtype or torch.bfloat16,
                        enabled=amp_dtype is not None):
        losses = vqvae_losses(model, images, beta, learned_codebook)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses[0]).backward()
    scaler.step(optimizer)  # with fused Adam the inf check stays on the device: no host sync
    scaler.update()
    return tuple(t.detach() for t in losses)


def perplexity(counts):
    """exp(H(p)) of a code histogram counts (K,): K when all codes are used equally, 1 at collapse."""
    p = counts / counts.sum()
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())


def code_usage(indices, K):
    """indices (any shape) -> (counts (K,), perplexity, codes used), all device tensors."""
    counts = count_codes(indices, K)
    return counts, perplexity(counts), (counts > 0).sum()


@torch.no_grad()
def evaluate_vqvae(model, split, batch_size=500):
    """Eval-mode pass over a whole split -> dict of floats: reconstruction (MSE on [-1, 1]),
    quantization (||z_q - z_e||^2), perplexity, codes_used, and counts (K,) as a CPU tensor."""
    was_training = model.training
    model.eval()
    K = model.codeBook.K
    sums = torch.zeros(2, dtype=torch.float64, device=split.device)
    counts = torch.zeros(K, device=split.device)
    for images, _ in split.batches(batch_size):
        x_tilde, z_e_x, z_q_x, indices = model(images, return_indices=True)
        sums[0] += F.mse_loss(x_tilde.float(), images, reduction="sum")
        sums[1] += F.mse_loss(z_q_x.float(), z_e_x.float(), reduction="sum") / z_e_x[0].numel()
        counts += count_codes(indices, K)
    model.train(was_training)
    n = len(split)
    reconstruction, quantization = (sums / torch.tensor([n * 28 * 28, n], device=sums.device)).tolist()
    return {"reconstruction": reconstruction, "quantization": quantization,
            "perplexity": perplexity(counts).item(), "codes_used": int((counts > 0).sum()),
            "counts": counts.cpu()}


# The training defaults (VQ-VAE.py's flags), chosen by the ablation in README.md. The seed repo's
# configuration is {"codebook": "loss", "codebook_init": "uniform", "dead_code_threshold": 0.0,
# "lr_schedule": "constant", "conv_init_scale": 1.0, "latent_init_scale": 1.0}.
DEFAULT_CONFIG = {"hidden_size": 40, "k": 512, "codebook": "ema", "codebook_init": "kmeans",
                  "ema_decay": 0.9, "dead_code_threshold": 6.0, "lr_schedule": "cosine",
                  "gradient": "straight-through", "conv_init_scale": 0.1, "latent_init_scale": 0.5}


def vqvae_from_config(config):
    """Build the VQ-VAE a checkpoint's `config` describes (seed defaults for missing options)."""
    return VectorQuantizedVAE(1, config["hidden_size"], config["k"],
                              codebook=config.get("codebook", "loss"),
                              codebook_init=config.get("codebook_init", "uniform"),
                              decay=config.get("ema_decay", 0.99),
                              dead_code_threshold=config.get("dead_code_threshold", 0.0),
                              gradient=config.get("gradient", "straight-through"),
                              conv_init_scale=config.get("conv_init_scale", 1.0),
                              latent_init_scale=config.get("latent_init_scale", 1.0))


def load_vqvae(path, device, flag="--model", sizes=None):
    """A VQ-VAE from a checkpoint, in eval mode. The checkpoint's config decides the model; `sizes`
    ({'hidden_size': D, 'k': K}, from flags the user gave) must agree with it, and build the model
    for a seed-style bare state_dict, which has no config (seed defaults 40 / 512 where absent)."""
    checkpoint = load_checkpoint(path, "vqvae", flag)
    sizes = sizes or {}
    config = checkpoint["config"] or {"hidden_size": sizes.get("hidden_size", 40),
                                      "k": sizes.get("k", 512)}
    for key, value in sizes.items():
        if value != config[key]:
            fail(f"--{key.replace('_', '-')} {value} contradicts {flag} {path}, "
                 f"which was trained with {config[key]}")
    model = vqvae_from_config(config)
    state_dict = checkpoint["state_dict"]
    if checkpoint["config"] is None:
        state_dict = with_seed_codebook_buffers(state_dict)
    load_state(model, state_dict, flag, path)
    return model.to(device).eval(), checkpoint


# The original repo's codebook is a bare nn.Embedding: its files hold none of these buffers.
SEED_MISSING_BUFFERS = ("codeBook.cluster_size", "codeBook.embed_avg", "codeBook.initialized")


def with_seed_codebook_buffers(state_dict):
    """A bare state_dict written by the original repo -> the same with the three codebook buffers
    a loss-codebook, already-initialised model has (the original's configuration). Anything else
    that is missing or extra is left for `load_state` to refuse."""
    weight = state_dict.get("codeBook.embedding.weight")
    if weight is None or any(key in state_dict for key in SEED_MISSING_BUFFERS):
        return state_dict
    return {**state_dict, "codeBook.cluster_size": torch.ones(len(weight)),
            "codeBook.embed_avg": weight.clone(), "codeBook.initialized": torch.tensor(True)}


# ------------------------------------------------------------------------------ prior over codes
class GatedMaskedConv2d(nn.Module):
    """One Gated PixelCNN layer (van den Oord et al. 2016, "Conditional Image Generation with
    PixelCNN Decoders", figure 2): a vertical stack that sees only the rows above and a horizontal
    stack that sees the pixels to the left in the current row, tanh * sigmoid gates, and the class
    embedding added to both gates (eq. 4). Splitting the stacks removes the PixelCNN blind spot.

    Shapes: x_v, x_h (B, C, H, W) -> (B, C, H, W), (B, C, H, W); class_bias (B, 2C).
    """

    def __init__(self, dim, kernel, first):
        super().__init__()
        self.first = first  # mask 'A': the current position itself is hidden
        half = kernel // 2
        # Causal by shape, not by a mask: a kernel that has no tap on the hidden row or column cannot
        # see it, whatever its weights, device or copy. Padded by `half` and cropped to the first H
        # output rows, a kernel of `rows` rows makes row i see rows i - half .. i - half + rows - 1
        # of the layer below: up to row i itself, or (first layer) up to row i - 1 only.
        rows, columns = (half, half) if first else (half + 1, half + 1)
        self.vertical = nn.Conv2d(dim, 2 * dim, (rows, kernel), padding=(half, half))
        self.vertical_to_horizontal = nn.Conv2d(2 * dim, 2 * dim, 1)
        # Horizontal, likewise: column j sees columns j - half .. j (first layer: .. j - 1).
        self.horizontal = nn.Conv2d(dim, 2 * dim, (1, columns), padding=(0, half))
        self.horizontal_out = nn.Conv2d(dim, dim, 1)
        if first:
            self._register_load_state_dict_pre_hook(self._drop_masked_taps)

    def _drop_masked_taps(self, state_dict, prefix, *_):
        """Priors written before the first layer was causal by shape kept the hidden row and column
        as zeroed weights: drop them, which leaves the function unchanged."""
        for name, dim in (("vertical", 2), ("horizontal", 3)):
            key = f"{prefix}{name}.weight"
            wanted = getattr(self, name).weight.size(dim)
            if key in state_dict and state_dict[key].dim() == 4 and \
                    state_dict[key].size(dim) == wanted + 1:
                state_dict[key] = state_dict[key].narrow(dim, 0, wanted)

    @staticmethod
    def gate(x):
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def vertical_step(self, x_v, bias):
        """x_v (B, C, H, W) -> pre-gate h_vertical (B, 2C, H, W), gated out_v (B, C, H, W)."""
        h_vertical = self.vertical(x_v)[:, :, :x_v.size(2), :]
        return h_vertical, self.gate(h_vertical + bias)

    def horizontal_step(self, h_vertical, x_h, bias):
        """x_h (B, C, H', W) with the matching rows of h_vertical -> out_h (B, C, H', W)."""
        h_horizontal = self.horizontal(x_h)[:, :, :, :x_h.size(3)]
        out = self.gate(self.vertical_to_horizontal(h_vertical) + h_horizontal + bias)
        out_h = self.horizontal_out(out)
        return out_h if self.first else out_h + x_h

    def forward(self, x_v, x_h, class_bias):
        bias = class_bias[:, :, None, None]
        h_vertical, out_v = self.vertical_step(x_v, bias)
        return out_v, self.horizontal_step(h_vertical, x_h, bias)


class GatedPixelCNN(nn.Module):
    """Class-conditional autoregressive prior p(codes | digit) over (H, W) maps of K-way codes.

    codes (B, H, W) int64, labels (B,) -> logits (B, K, H, W); the logits at (i, j) depend only on
    the codes before (i, j) in raster order."""

    def __init__(self, K=512, dim=64, num_layers=12, num_classes=10):
        super().__init__()
        self.K = K
        self.embedding = nn.Embedding(K, dim)
        self.class_embedding = nn.Embedding(num_classes, 2 * dim * num_layers)
        self.layers = nn.ModuleList(
            GatedMaskedConv2d(dim, 7 if i == 0 else 3, first=i == 0) for i in range(num_layers))
        self.output = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, 4 * dim, 1), nn.ReLU(),
                                    nn.Conv2d(4 * dim, K, 1))

    def forward(self, codes, labels):
        return self.output(self.stacks_embedded(self.embedding(codes).permute(0, 3, 1, 2), labels))

    def stacks_embedded(self, x, labels):
        """x (B, dim, H, W) embedded codes -> features (B, dim, H, W)."""
        biases = self.class_embedding(labels).chunk(len(self.layers), dim=1)
        x_v = x_h = x
        for layer, bias in zip(self.layers, biases):
            x_v, x_h = layer(x_v, x_h, bias)
        return x_h

    @torch.no_grad()
    def sample(self, labels, shape=(7, 7), temperature=1.0):
        """labels (B,) -> codes (B, H, W), one position at a time in raster order.

        The vertical stacks at row i see only rows < i, so they run once per row; within the row
        only the horizontal stacks of that one row (B, C, 1, W) run again for each position."""
        codes = torch.zeros(len(labels), *shape, dtype=torch.long, device=labels.device)
        biases = [b[:, :, None, None] for b in
                  self.class_embedding(labels).chunk(len(self.layers), dim=1)]
        for i in range(shape[0]):
            x_v = self.embedding(codes[:, :i + 1]).permute(0, 3, 1, 2)    # (B, dim, i+1, W)
            vertical_rows = []
            for layer, bias in zip(self.layers, biases):
                h_vertical, x_v = layer.vertical_step(x_v, bias)
                vertical_rows.append(h_vertical[:, :, i:i + 1])           # (B, 2 dim, 1, W)
            for j in range(shape[1]):
                x_h = self.embedding(codes[:, i:i + 1]).permute(0, 3, 1, 2)  # (B, dim, 1, W)
                for layer, bias, h_vertical in zip(self.layers, biases, vertical_rows):
                    x_h = layer.horizontal_step(h_vertical, x_h, bias)
                logits = self.output(x_h[:, :, :, j:j + 1])[:, :, 0, 0].float()   # (B, K)
                probs = torch.softmax(logits / temperature, 1)
                codes[:, i, j] = torch.multinomial(probs, 1).squeeze(1)
        return codes


def load_prior(path, device, K):
    """A prior checkpoint of pixelcnn_prior.py, in eval mode; it must model codes of K entries."""
    checkpoint = load_checkpoint(path, "prior", "--prior-model")
    config = checkpoint["config"]
    if config["k"] != K:
        fail(f"--prior-model {path} was built for a codebook of K={config['k']}, but the VQ-VAE "
             f"has K={K}")
    prior = GatedPixelCNN(config["k"], config["hidden_size"], config["num_layers"])
    load_state(prior, checkpoint["state_dict"], "--prior-model", path)
    return prior.to(device).eval()


def to_uint8(images):
    """images in [-1, 1] -> uint8 pixels in [0, 255]."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------- classifier (the judge)
class MNISTClassifier(nn.Module):
    """Small CNN judge of generated digits: images (B, 1, 28, 28) in [-1, 1] -> logits (B, 10);
    `features` gives the 128-d penultimate activations used for Frechet distances."""

    num_features = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 3 * 3, self.num_features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.num_features, 10))

    def features(self, images):
        return self.body(images)

    def forward(self, images):
        return self.head(self.body(images))


# ------------------------------------------------------------------------------------------ data
MNIST_FILES = {  # decompressed name -> size in bytes (IDX header + payload)
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}
SHIPPED_MNIST = os.path.join(REPO_DIR, "MNIST")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_shipped_mnist(raw):
    """Verify the shipped .gz files against MNIST/SHA256SUMS and decompress them into `raw`."""
    with open(os.path.join(SHIPPED_MNIST, "SHA256SUMS")) as f:
        expected = dict(reversed(line.split()) for line in f if line.strip())
    os.makedirs(raw, exist_ok=True)
    for name in MNIST_FILES:
        source = os.path.join(SHIPPED_MNIST, name + ".gz")
        if _sha256(source) != expected.get(name + ".gz"):
            fail(f"shipped dataset file {source} does not match MNIST/SHA256SUMS; "
                 f"restore it with `git checkout -- MNIST/`")
        target = os.path.join(raw, name)
        if os.path.exists(target):
            continue
        with gzip.open(source, "rb") as src, open(target + ".part", "wb") as dst:
            dst.write(src.read())
        os.replace(target + ".part", target)


def prepare_mnist(data_folder):
    """Make sure `data_folder/MNIST/raw/` holds the four decompressed IDX files: use them if present,
    else extract the shipped copy, else let torchvision download. Bad files: one line and exit 2."""
    if os.path.exists(data_folder) and not os.path.isdir(data_folder):
        fail(f"--data-folder {data_folder} is a file; expected a folder (it will hold MNIST/raw/)")
    raw = os.path.join(data_folder, "MNIST", "raw")
    missing = [n for n in MNIST_FILES if not os.path.exists(os.path.join(raw, n))]
    try:
        if missing and os.path.exists(os.path.join(SHIPPED_MNIST, "SHA256SUMS")):
            _extract_shipped_mnist(raw)
        elif missing:
            datasets.MNIST(data_folder, train=True, download=True)
            datasets.MNIST(data_folder, train=False, download=True)
    except OSError as e:
        fail(f"cannot prepare MNIST in --data-folder {data_folder}: {e}")
    for name, size in MNIST_FILES.items():
        path = os.path.join(raw, name)
        if not os.path.exists(path):
            fail(f"dataset file {path} is missing and could not be extracted or downloaded")
        if os.path.getsize(path) != size:
            fail(f"dataset file {path} is truncated or corrupt ({os.path.getsize(path)} bytes, "
                 f"expected {size}); delete it and rerun to extract it again")


def normalize(images_uint8):
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [-1, 1]: the same ops as ToTensor +
    Normalize([0.5], [0.5]), so both input pipelines give bit-identical batches."""
    return images_uint8.unsqueeze(1).float().div(255).sub(0.5).div(0.5)


class MNISTSplit:
    """One MNIST split, served in batches by one of two pipelines:
    'device'       the whole split as a uint8 tensor on the training device, normalised per batch;
    'torchvision'  the seed's Dataset/DataLoader path (PIL decode, ToTensor, Normalize, workers).
    Both take the same index order, so they yield the same images in the same batches."""

    def __init__(self, data_folder, train, device, pipeline="device", num_workers=0, limit=None):
        prepare_mnist(data_folder)
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
        self.dataset = datasets.MNIST(data_folder, train=train, download=False, transform=transform)
        self.size = len(self.dataset) if limit is None else min(limit, len(self.dataset))
        self.device, self.pipeline, self.num_workers = torch.device(device), pipeline, num_workers
        if pipeline == "device":
            self.images = self.dataset.data[:self.size].to(self.device)          # (N, 28, 28) uint8
            self.labels = self.dataset.targets[:self.size].to(self.device)

    def __len__(self):
        return self.size

    def batches(self, batch_size, order=None, start=0, rank=0, world_size=1):
        """Yield (images (b, 1, 28, 28), labels (b,)) on the device. `order` is a permutation of the
        split (default: file order); batching skips the first `start` batches (resume) and, under
        DDP, each rank takes every world_size-th image of each global batch."""
        order = torch.arange(self.size) if order is None else order
        if self.pipeline == "device":  # one copy per epoch, not one per batch
            order = order.to(self.device)
        slices = [order[i:i + batch_size][rank::world_size]
                  for i in range(start * batch_size, self.size, batch_size)]
        if self.pipeline == "device":
            for idx in slices:
                yield normalize(self.images[idx]), self.labels[idx]
            return
        # Its own generator: a DataLoader otherwise draws worker seeds from the global RNG, and the
        # two pipelines would then diverge at the next random draw of training.
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=[idx.tolist() for idx in slices],
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator())
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))


# ----------------------------------------------------------------------------------- checkpoints
CHECKPOINT_KINDS = {"vqvae": "VQ-VAE.py", "prior": "pixelcnn_prior.py", "classifier": "classifier.py"}


def save_checkpoint(path, checkpoint):
    """Write atomically: a temp file in the same folder, flushed to disk, then renamed over `path`.
    A crash or a full disk mid-write leaves the previous file at `path` untouched."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, kind, flag="--model"):
    """Load a checkpoint with weights_only=True (no pickled code can run) and check who wrote it.
    Returns a dict with at least 'state_dict' and 'config' (None for a seed-style bare state_dict).
    Every failure is one line naming the flag and file, exit 2."""
    if not os.path.isfile(path):
        fail(f"{flag} {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # the weights-only unpickler met a reference to a Python callable
            fail(f"{flag} {path}: refused, the file holds pickled Python objects that could run "
                 f"code; only tensors and plain values are loaded (weights_only=True)")
        fail(f"{flag} {path}: not a PyTorch checkpoint, or truncated")
    except Exception:  # torch raises several types for empty, truncated or foreign files
        fail(f"{flag} {path}: not a PyTorch checkpoint, or truncated")
    if not isinstance(checkpoint, dict) or not checkpoint:
        fail(f"{flag} {path}: not a checkpoint dict")
    if "state_dict" not in checkpoint:
        if kind == "vqvae" and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return {"kind": "vqvae", "state_dict": checkpoint, "config": None}
        fail(f"{flag} {path}: not a checkpoint of this repo (no 'state_dict')")
    found = checkpoint.get("kind", "vqvae")
    if found != kind:
        fail(f"{flag} {path}: this is a {found} checkpoint written by "
             f"{CHECKPOINT_KINDS.get(found, 'another script')}; expected a {kind} checkpoint "
             f"written by {CHECKPOINT_KINDS[kind]}")
    return checkpoint


def load_resume_checkpoint(path, kind):
    """`load_checkpoint` for --resume, which also needs the training state: a weights-only file
    (a seed-style bare state_dict, the committed models/pretrained/ copies) is refused."""
    checkpoint = load_checkpoint(path, kind, "--resume")
    if "optimizer" not in checkpoint:
        fail(f"--resume {path}: weights only, without the optimizer state a resume needs; "
             f"resume from the run's last.pt")
    return checkpoint


def load_state(model, state_dict, flag, path):
    """load_state_dict, or one line naming the first keys that are missing, unexpected or of
    another size (the model is then discarded: `fail` exits)."""
    def first(keys):
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    expected = model.state_dict()
    problems = [f"{what} {first(keys)}" for what, keys in
                (("missing", [k for k in expected if k not in state_dict]),
                 ("unexpected", [k for k in state_dict if k not in expected])) if keys]
    try:
        model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:
        resized = [line.split("size mismatch for ")[1].split(":")[0]
                   for line in str(e).splitlines() if "size mismatch for " in line]
        problems.append(f"other sizes: {first(resized)}" if resized else str(e).splitlines()[0])
    if problems:
        fail(f"{flag} {path}: weights do not fit the model ({'; '.join(problems)})")


# ------------------------------------------------------------------------------------------- CLI
def fail(message, status=2):
    """Bad input: one line on stderr, no traceback, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no multi-line usage block), exit status 2."""

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


def _number(cast, test, expected):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        if isinstance(value, float) and not math.isfinite(value) or not test(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
nonnegative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
decay_float = _number(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")


def add_vqvae_size_flags(parser, *aliases):
    """--hidden-size-vae (and `aliases`) and --k: the sizes of a seed-style bare state_dict, which
    has no config; for a checkpoint of this repo they are optional and must agree with it."""
    g = parser.add_argument_group("VQ-VAE sizes (only needed for the original repo's bare state_dicts)")
    g.add_argument(*aliases, "--hidden-size-vae", dest="vqvae_hidden_size", type=positive_int,
                   default=None, metavar="D", help="codeword size D (40 when the file does not say)")
    g.add_argument("--k", dest="vqvae_k", type=positive_int, default=None, metavar="K",
                   help="number of codewords K (512 when the file does not say)")


def vqvae_sizes(args):
    """The sizes given with `add_vqvae_size_flags`' flags, as `load_vqvae` takes them."""
    return {key: value for key, value in (("hidden_size", args.vqvae_hidden_size),
                                          ("k", args.vqvae_k)) if value is not None}


def resolve_device(name):
    """'cpu', 'cuda', 'cuda:N' -> torch.device. Plain 'cuda' without a GPU falls back to the CPU
    with a warning (the seed's behaviour); an explicit GPU index that does not exist is an error."""
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name!r}: unknown device; expected cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        fail(f"--device {name!r}: unsupported device; expected cpu, cuda or cuda:N")
    if device.index is None and not torch.cuda.is_available():
        print("warning: --device cuda: no CUDA GPU available, falling back to cpu", file=sys.stderr)
        return torch.device("cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def prepare_run_folders(name, resume, overwrite, rank=0):
    """logs/<name> and models/<name>, created by rank 0. An earlier run's checkpoints are never
    silently replaced: that needs --resume (continue it) or --overwrite (delete it first)."""
    log_dir, model_dir = os.path.join("logs", name), os.path.join("models", name)
    if rank != 0:
        return log_dir, model_dir
    earlier = glob.glob(os.path.join(model_dir, "*.pt"))
    if earlier and not resume and not overwrite:
        fail(f"{model_dir}/ already holds checkpoints of an earlier run; pass "
             f"--resume {model_dir}/last.pt to continue it or --overwrite to start over")
    make_output_dirs(log_dir, model_dir)
    if overwrite and not resume:
        for path in earlier + glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
            os.remove(path)
    return log_dir, model_dir


def apply_resume_config(parser, args, config, locked):
    """--resume: flags left at their default take the resumed run's value, except where the data
    and device are (the run may resume on another machine); a flag in `locked` that was given and
    contradicts the checkpoint is an error (one line, exit 2). A cosine schedule spans the steps the
    run was started with (past them it would climb back up), so its length is locked too."""
    if config.get("lr_schedule") == "cosine":
        locked = (*locked, "num_epochs", "max_steps")
    for key, value in config.items():
        if key in ("data_folder", "device", "num_workers"):
            continue
        mine = getattr(args, key, None)
        if mine == parser.get_default(key) or key in locked and mine == value:
            setattr(args, key, value)
        elif key in locked:
            why = " (its cosine learning-rate schedule ends there)" \
                if key in ("num_epochs", "max_steps") else ""
            fail(f"--{key.replace('_', '-')} {mine} conflicts with the checkpoint "
                 f"--resume {args.resume}, which was trained with {value}{why}")


def rng_state(shuffle):
    """Every random state a run draws from (torch, CUDA, numpy, python, the shuffling generator),
    as tensors and plain values so that weights_only loading reads it back."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(state, shuffle):
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    restore_cuda_rng(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))


def restore_cuda_rng(states):
    """The saved RNG state of each GPU that exists here; GPUs the checkpoint knew and this machine
    lacks are skipped, GPUs it did not know keep their seeded state, with a warning either way."""
    present = torch.cuda.device_count()
    if states and len(states) != present:
        print(f"warning: the checkpoint holds the random state of {len(states)} GPU(s), this "
              f"machine has {present}; restoring {min(len(states), present)}", file=sys.stderr)
    for index, cuda_state in enumerate(states[:present]):
        torch.cuda.set_rng_state(cuda_state, index)


def agree_to_stop(signum, nonfinite, world_size, device):
    """-> (signal number, whether a loss was non-finite), each the maximum over all processes. Every
    process calls it at the same step (one all-reduce), so a signal that reached one process, or a
    NaN in one, stops them all at that step instead of leaving the rest waiting in a collective."""
    if world_size == 1:
        return signum, nonfinite
    flags = torch.tensor([signum, int(nonfinite)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    signum, nonfinite = flags.tolist()
    return signum, bool(nonfinite)


def end_distributed(world_size):
    """Under torchrun: wait for every process (rank 0 may be writing a checkpoint), then leave the
    process group, so that all exit together and cleanly."""
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed):
    """Seed torch, numpy and python; returns the generator that shuffles the training data."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return torch.Generator().manual_seed(seed)


def make_output_dirs(*paths):
    """Create output folders, or stop with one line naming the one that cannot be written."""
    for path in paths:
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f".write-test-{os.getpid()}")
            open(probe, "wb").close()
            os.remove(probe)
        except OSError as e:
            fail(f"cannot write output folder {path}: {e.strerror or e}")
