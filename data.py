"""MNIST: the shipped copy verified and extracted, and the two input pipelines (the whole split on
the training device, or the original's torchvision DataLoader) that give the same batches."""

import gzip
import hashlib
import math
import os
import shutil
import struct

import torch

from cli import fail
from files import atomic_write


REPO_DIR = os.path.dirname(os.path.abspath(__file__))


# decompressed name -> its IDX header (magic number 2051 images or 2049 labels, then the sizes)
MNIST_HEADERS = {
    "train-images-idx3-ubyte": struct.pack(">4I", 2051, 60000, 28, 28),
    "train-labels-idx1-ubyte": struct.pack(">2I", 2049, 60000),
    "t10k-images-idx3-ubyte": struct.pack(">4I", 2051, 10000, 28, 28),
    "t10k-labels-idx1-ubyte": struct.pack(">2I", 2049, 10000),
}
# decompressed name -> SHA-256 of its bytes: a file of the right size with a changed pixel or label
# would otherwise train and judge silently
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_FILES = {  # decompressed name -> size in bytes (IDX header + payload)
    name: len(header) + math.prod(struct.unpack(f">{len(header) // 4}I", header)[1:])
    for name, header in MNIST_HEADERS.items()}


SHIPPED_MNIST = os.path.join(REPO_DIR, "MNIST")


# The training split in two: the judges and the prior learn from the first 50,000 images and choose
# their checkpoints on the last 10,000 (--hold-out), so that the test set only reports;
# sample_quality.py takes its reference from these 10,000 and its floor from the first 50,000.
TRAIN_IMAGES = 60000
HOLD_OUT = 10000


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# (path, size, mtime) of the files this process found to be MNIST's: each split a script builds
# would otherwise hash them again (about 60 ms for the four)
_VERIFIED = set()


def _is_mnist(path, name):
    """Whether the file at `path` holds MNIST's `name`, by its SHA-256 (once per process and file
    version)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED and _sha256(path) == MNIST_SHA256[name]:
        _VERIFIED.add(key)
    return key in _VERIFIED


def _extract_shipped_mnist(raw, missing):
    """Verify the shipped .gz files against MNIST/SHA256SUMS and decompress the `missing` ones into
    `raw`. Any number of processes may do this at once: each writes its own temp file and renames
    it into place (`atomic_write`), so whichever finishes last leaves the same bytes."""
    with open(os.path.join(SHIPPED_MNIST, "SHA256SUMS")) as f:
        expected = dict(reversed(line.split()) for line in f if line.strip())
    os.makedirs(raw, exist_ok=True)
    for name in missing:
        source = os.path.join(SHIPPED_MNIST, name + ".gz")
        if _sha256(source) != expected.get(name + ".gz"):
            fail(f"shipped dataset file {source} does not match MNIST/SHA256SUMS; "
                 f"restore it with `git checkout -- MNIST/`")
        with gzip.open(source, "rb") as src, atomic_write(os.path.join(raw, name)) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def _download_mnist(data_folder, raw):
    """torchvision's download, one process at a time (it writes fixed file names in place): the
    others wait for the lock, then find the files there and download nothing."""
    from filelock import FileLock
    os.makedirs(raw, exist_ok=True)
    with FileLock(os.path.join(raw, ".download.lock")):
        if all(os.path.exists(os.path.join(raw, name)) for name in MNIST_FILES):
            return
        from torchvision import datasets   # here: importing torchvision costs seconds
        datasets.MNIST(data_folder, train=True, download=True)
        datasets.MNIST(data_folder, train=False, download=True)


def prepare_mnist(data_folder):
    """Make sure `data_folder/MNIST/raw/` holds the four decompressed IDX files: use them if present,
    else extract the shipped copy, else let torchvision download. Safe for many processes preparing
    one folder at once. A file of another size or other bytes than MNIST's: one line and exit 2."""
    if not data_folder:   # '' would be the working folder: the repo's own MNIST/ when run there
        fail("--data-folder '': expected a folder name (it will hold MNIST/raw/)")
    if os.path.exists(data_folder) and not os.path.isdir(data_folder):
        fail(f"--data-folder {data_folder} is a file; expected a folder (it will hold MNIST/raw/)")
    raw = os.path.join(data_folder, "MNIST", "raw")
    missing = [n for n in MNIST_FILES if not os.path.exists(os.path.join(raw, n))]
    try:
        if missing and os.path.exists(os.path.join(SHIPPED_MNIST, "SHA256SUMS")):
            _extract_shipped_mnist(raw, missing)
        elif missing:
            _download_mnist(data_folder, raw)
    except OSError as e:
        fail(f"cannot prepare MNIST in --data-folder {data_folder}: {e}")
    for name, size in MNIST_FILES.items():
        path = os.path.join(raw, name)
        if not os.path.exists(path):
            fail(f"dataset file {path} is missing and could not be extracted or downloaded")
        if os.path.getsize(path) != size:
            fail(f"dataset file {path} is truncated or corrupt ({os.path.getsize(path)} bytes, "
                 f"expected {size}); delete it and rerun to extract it again")
        if not _is_mnist(path, name):
            fail(f"dataset file {path} is corrupt (its SHA-256 is not that of MNIST's {name}); "
                 f"delete it and rerun to extract it again")


def read_idx(path, header_bytes):
    """An IDX file (sizes checked by prepare_mnist) -> its payload as a flat uint8 tensor."""
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()[header_bytes:]), dtype=torch.uint8)


def normalize(images_uint8):
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [-1, 1]: the same ops as ToTensor +
    Normalize([0.5], [0.5]), so both input pipelines give bit-identical batches."""
    return images_uint8.unsqueeze(1).float().div(255).sub(0.5).div(0.5)


def to_uint8(images):
    """images in [-1, 1] -> uint8 pixels in [0, 255]."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class MNISTSplit:
    """One MNIST split, served in batches by one of two pipelines:
    'device'       the whole split as a uint8 tensor on the training device, normalised per batch;
    'torchvision'  the original's Dataset/DataLoader path (PIL decode, ToTensor, Normalize, workers).
    Both take the same index order, so they yield the same images in the same batches."""

    def __init__(self, data_folder, train, device, pipeline="device", num_workers=0, limit=None,
                 start=0):
        """The split's images start .. start + limit (default: to its end)."""
        prepare_mnist(data_folder)
        raw = os.path.join(data_folder, "MNIST", "raw", "train" if train else "t10k")
        labels = read_idx(f"{raw}-labels-idx1-ubyte", 8).long()[start:]         # (N,)
        self.size = len(labels) if limit is None else min(limit, len(labels))
        self.start = start
        self.device, self.pipeline, self.num_workers = torch.device(device), pipeline, num_workers
        if pipeline == "device":
            images = read_idx(f"{raw}-images-idx3-ubyte", 16).view(-1, 28, 28)  # (N, 28, 28) uint8
            self.images = images[start:start + self.size].to(self.device)
            self.labels = labels[:self.size].to(self.device)
        else:  # imported here: torchvision costs seconds at start-up, and only this path needs it
            from torchvision import datasets, transforms
            transform = transforms.Compose([transforms.ToTensor(),
                                            transforms.Normalize([0.5], [0.5])])
            self.dataset = datasets.MNIST(data_folder, train=train, download=False,
                                          transform=transform)

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
            self.dataset, batch_sampler=[(idx + self.start).tolist() for idx in slices],
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator())
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))


def check_training_split(hold_out, train_subset, least_hold_out=0):
    """--hold-out and --train-subset leave images to train on (train_subset of them at most), or
    one line naming the flag: --train-subset 10 with --hold-out 59999 would train on one image."""
    if not least_hold_out <= hold_out < TRAIN_IMAGES:
        fail(f"--hold-out {hold_out}: expected {least_hold_out} to {TRAIN_IMAGES - 1} images")
    if train_subset and train_subset > TRAIN_IMAGES - hold_out:
        fail(f"--train-subset {train_subset}: --hold-out {hold_out} leaves "
             f"{TRAIN_IMAGES - hold_out} training images")


def training_slices(data_folder, device, hold_out, train_subset=None):
    """-> (the first 60,000 - hold_out training images, or the first train_subset of them; the last
    hold_out, or None for 0): what a trainer learns from, and what chooses its best.pt."""
    fit = MNISTSplit(data_folder, True, device, limit=min(train_subset or TRAIN_IMAGES,
                                                          TRAIN_IMAGES - hold_out))
    held_out = MNISTSplit(data_folder, True, device, start=TRAIN_IMAGES - hold_out) \
        if hold_out else None
    return fit, held_out
