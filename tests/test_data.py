"""MNIST (data.py): the shipped copy checked and extracted by any number of processes at once, the
two input pipelines giving the same batches, the training split's held-out slice, damaged files."""
import os

import pytest
import torch

from conftest import TINY, assert_clean_failure, run
from data import MNISTSplit, training_slices


def test_both_pipelines_give_identical_batches(data_folder):
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    fast = MNISTSplit(data_folder, True, "cpu", "device", limit=300)
    seed_style = MNISTSplit(data_folder, True, "cpu", "torchvision", num_workers=0, limit=300)
    fast_batches, seed_batches = list(fast.batches(128, order)), list(seed_style.batches(128, order))
    assert len(fast_batches) == len(seed_batches) == 3
    for (a, la), (b, lb) in zip(fast_batches, seed_batches):
        assert torch.equal(a, b) and torch.equal(la, lb)
    images, _ = next(fast.batches(300))
    assert images.min() == -1 and images.max() == 1
    assert abs((images.mean().item() + 1) / 2 - 0.1307) < 0.02  # MNIST's known pixel mean


def test_training_rejects_data_folder_that_is_a_file_or_empty(tmp_path):
    """A file, or '' (which would extract into the working folder's MNIST/: the repo's own copy
    when run there)."""
    (tmp_path / "afile").write_text("x")
    result = run("VQ-VAE.py", "--data-folder", "afile", cwd=tmp_path, check=False)
    assert_clean_failure(result, "--data-folder")
    result = run("VQ-VAE.py", "--data-folder", "", cwd=tmp_path, check=False)
    assert_clean_failure(result, "--data-folder ''")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("damage", ["truncate", "header", "label", "pixel", "corrupt_shipped"])
def test_training_rejects_damaged_dataset(tmp_path, data_folder, damage, monkeypatch):
    """A dataset file cut short, or of the right size with a foreign header, a label that is no
    digit or another digit's, or one pixel changed: one line naming it, and the file left for the
    user to see."""
    import shutil
    if damage != "corrupt_shipped":
        raw = tmp_path / "data" / "MNIST" / "raw"
        shutil.copytree(os.path.join(data_folder, "MNIST", "raw"), raw)
        name, at, write, words = {
            "truncate": ("t10k-images-idx3-ubyte", 1000, None, "truncated"),
            "header": ("t10k-images-idx3-ubyte", 3, b"\x01", "SHA-256"),
            "label": ("t10k-labels-idx1-ubyte", 20, b"\x03", "SHA-256"),
            "pixel": ("train-images-idx3-ubyte", 16 + 28 * 14 + 14, b"\x80", "SHA-256")}[damage]
        with open(raw / name, "r+b") as f:
            f.seek(at)
            f.write(write) if write else f.truncate(at)
        before = (raw / name).read_bytes()
        result = run("VQ-VAE.py", "--data-folder", "data", *TINY, cwd=tmp_path, check=False)
        assert_clean_failure(result, name, words)
        assert (raw / name).read_bytes() == before  # left for the user to see
    else:
        import data
        shipped = tmp_path / "shipped"
        shutil.copytree(data.SHIPPED_MNIST, shipped)
        with open(shipped / "train-labels-idx1-ubyte.gz", "r+b") as f:
            f.seek(100)
            f.write(b"garbage")
        monkeypatch.setattr(data, "SHIPPED_MNIST", str(shipped))
        with pytest.raises(SystemExit) as exit_info:
            data.prepare_mnist(str(tmp_path / "fresh"))
        assert exit_info.value.code == 2


def prepare_at_barrier(barrier, folder):
    import data
    barrier.wait()
    data.prepare_mnist(folder)


def test_many_processes_prepare_one_fresh_data_folder_at_once(tmp_path):
    """6 processes released together prepare one fresh --data-folder, three times over: every one
    succeeds, and the folder holds exactly the four files, byte for byte the decompressed shipped
    files that MNIST/SHA256SUMS vouches for (prepare_mnist checks the .gz against it)."""
    import gzip
    import hashlib
    import multiprocessing
    import data
    decompressed = {name: hashlib.sha256(gzip.open(os.path.join(data.SHIPPED_MNIST, name + ".gz"))
                                         .read()).hexdigest() for name in data.MNIST_FILES}
    context = multiprocessing.get_context("fork")  # starts at once: no new interpreter to import
    for attempt in range(3):
        folder = tmp_path / f"data{attempt}"
        barrier = context.Barrier(6)
        processes = [context.Process(target=prepare_at_barrier, args=(barrier, str(folder)))
                     for _ in range(6)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
        assert [process.exitcode for process in processes] == [0] * 6, attempt
        raw = folder / "MNIST" / "raw"
        assert sorted(os.listdir(raw)) == sorted(data.MNIST_FILES), attempt
        for name, digest in decompressed.items():
            assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == digest, name


def test_training_slices_hold_out_the_last_images(data_folder):
    fit, held_out = training_slices(data_folder, "cpu", 10000)
    assert (len(fit), len(held_out)) == (50000, 10000)
    whole = MNISTSplit(data_folder, True, "cpu")
    assert torch.equal(held_out.images, whole.images[50000:])
    assert torch.equal(held_out.labels, whole.labels[50000:])
    small, none = training_slices(data_folder, "cpu", 0, train_subset=100)
    assert len(small) == 100 and none is None
    assert torch.equal(small.images, whole.images[:100])
