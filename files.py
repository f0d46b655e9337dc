"""Files that several processes may write at the same moment (torchrun ranks, runs side by side, a
notebook next to a terminal): each file is written whole under a name private to its writer and then
renamed into place, so a reader sees the old file or the new one, never half of one; and a run
folder belongs to one run at a time."""

import contextlib
import os
import sys
import uuid

from cli import fail


@contextlib.contextmanager
def atomic_write(path, replace=True):
    """`with atomic_write(path) as f:` write to the binary file f; on success it is flushed to disk
    and renamed over `path` in one step. On any failure `path` keeps its previous content and the
    private temp file is removed. The temp name is unique per process and per call, so writers of
    the same path never share one (they race only for which finished file stays). With
    replace=False the name is claimed first, by an exclusive create (FileExistsError if it is
    taken, also by a writer that started a moment earlier), and released on failure."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    claimed = False
    if not replace:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        claimed = True
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        claimed = False
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if claimed:
            os.remove(path)


class Unclaimed:
    """What `claim_folder` returns where the file system has no locks: nothing to release."""

    def release(self):
        pass


def claim_folder(folder):
    """An exclusive lock on `folder`/.run.lock, held while the returned object lives (the OS drops
    it when the process ends, however it ends) -> the lock, or None when another process holds it.
    On a file system without locks (some network mounts) a warning, and `Unclaimed`."""
    from filelock import FileLock, Timeout
    lock = FileLock(os.path.join(folder, ".run.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    except (OSError, NotImplementedError) as e:
        print(f"warning: cannot lock {folder}/ ({e}); two runs of this name at once would not "
              f"be stopped", file=sys.stderr)
        return Unclaimed()
    return lock


# The longest file name `atomic_write` can write: most file systems allow 255 bytes, and its
# private name adds ".tmp-<pid>-<8 hex>" (at most 24 bytes).
MAX_NAME_BYTES = 255 - 24


def check_folder(path, problem):
    """Whether folder `path` exists or can be created and is writable, before anything is made;
    else one line: `problem` (what cannot be written), and why."""
    existing = path
    while existing and not os.path.isdir(existing):
        if os.path.lexists(existing):
            fail(f"{problem}: {existing} is a file, not a folder")
        existing = os.path.dirname(existing)
    if not os.access(existing or ".", os.W_OK | os.X_OK):
        fail(f"{problem}: {existing or '.'} is not writable")


def check_file_to_write(path, flag, may_exist=True):
    """Before any work: `path` can be written as a file (its folder exists or can be made, and is
    writable; the name fits; with may_exist=False, nothing is there yet), or stop with one line
    naming `flag`."""
    if not path:
        fail(f"{flag} '': expected a file name")
    if os.path.isdir(path):
        fail(f"{flag} {path}: is a folder; give a file name")
    if not may_exist and os.path.lexists(path):
        fail(f"{flag} {path}: exists; give a new name or delete it first")
    check_folder(os.path.dirname(path), f"{flag} {path}: cannot write it")
    if len(os.fsencode(os.path.basename(path))) > MAX_NAME_BYTES:
        fail(f"{flag} {path}: the file name is longer than {MAX_NAME_BYTES} bytes")


def make_output_dirs(*paths):
    """Create output folders, or stop with one line naming the one that cannot be written. Every
    path is checked before any is created, so a refusal leaves nothing behind."""
    for path in paths:
        check_folder(path, f"cannot write output folder {path}")
    for path in paths:
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            open(probe, "wb").close()
            os.remove(probe)
        except OSError as e:
            fail(f"cannot write output folder {path}: {e.strerror or e}")
