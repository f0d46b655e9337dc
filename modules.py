"""The VQ-VAE model and the pieces every script shares: MNIST loading, safe checkpoints, CLI checks.

Model shapes (B images, D = --hidden-size, K = --k):
    x (B, 1, 28, 28) in [-1, 1] -> encoder -> z_e_x (B, D, 7, 7) -> codebook -> indices (B, 7, 7)
    -> z_q_x (B, D, 7, 7) -> decoder -> x_tilde (B, 1, 28, 28) in [-1, 1]
"""
import argparse
import gzip
import hashlib
import math
import os
import pickle
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import datasets, transforms

from vector_quantizer import CODEBOOK_INITS, CODEBOOKS, VQEmbedding  # noqa: F401  (re-exported)

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
                 dead_code_threshold=0.0):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(input_dim, dim, 4, 2, 1),
            nn.BatchNorm2d(dim),
            nn.ReLU(True),
            nn.Conv2d(dim, dim, 4, 2, 1),
            ResBlock(dim),
            ResBlock(dim),
        )
        self.codeBook = VQEmbedding(K, dim, codebook, codebook_init, decay, dead_code_threshold)
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


def train_step(model, optimizer, images, beta, learned_codebook, amp=False):
    """One optimisation step (bf16 autocast when `amp`) -> the `vqvae_losses` tuple, detached."""
    with torch.autocast(images.device.type, torch.bfloat16, enabled=amp):
        losses = vqvae_losses(model, images, beta, learned_codebook)
    optimizer.zero_grad(set_to_none=True)
    losses[0].backward()
    optimizer.step()
    return tuple(t.detach() for t in losses)


def code_usage(indices, K):
    """indices (any shape) -> (counts (K,), perplexity, codes used), all device tensors.
    Perplexity exp(H(p)) of the code histogram: K when all codes are equally used, 1 at collapse."""
    counts = torch.bincount(indices.flatten(), minlength=K).float()
    p = counts / counts.sum()
    perplexity = torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())
    return counts, perplexity, (counts > 0).sum()


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
        counts += torch.bincount(indices.flatten(), minlength=K)
    model.train(was_training)
    n = len(split)
    p = counts / counts.sum()
    perplexity = torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())
    reconstruction, quantization = (sums / torch.tensor([n * 28 * 28, n], device=sums.device)).tolist()
    return {"reconstruction": reconstruction, "quantization": quantization,
            "perplexity": perplexity.item(), "codes_used": int((counts > 0).sum()),
            "counts": counts.cpu()}


MODEL_CONFIG_KEYS = ("hidden_size", "k", "codebook", "codebook_init", "ema_decay",
                     "dead_code_threshold")


def vqvae_from_config(config):
    """Build the VQ-VAE a checkpoint's `config` describes (seed defaults for missing options)."""
    return VectorQuantizedVAE(1, config["hidden_size"], config["k"],
                              codebook=config.get("codebook", "loss"),
                              codebook_init=config.get("codebook_init", "uniform"),
                              decay=config.get("ema_decay", 0.99),
                              dead_code_threshold=config.get("dead_code_threshold", 0.0))


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
    load_state(model, checkpoint["state_dict"], flag, path)
    return model.to(device).eval(), checkpoint


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
        slices = [order[i:i + batch_size][rank::world_size]
                  for i in range(start * batch_size, self.size, batch_size)]
        if self.pipeline == "device":
            for idx in slices:
                idx = idx.to(self.device)
                yield normalize(self.images[idx]), self.labels[idx]
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=[idx.tolist() for idx in slices],
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
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
    except pickle.UnpicklingError:
        fail(f"{flag} {path}: refused, the file holds pickled Python objects that could run code; "
             f"only tensors and plain values are loaded (weights_only=True)")
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


def load_state(model, state_dict, flag, path):
    """load_state_dict with a one-line error when the sizes do not match the model."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line),
                      str(e).splitlines()[0])
        fail(f"{flag} {path}: weights do not fit the model ({detail})")


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
