"""Files written whole or not at all (a kill or a power cut never leaves half of one), and one job
at a time on a run directory or a results file (`hold`)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .config import EnvironmentProblem


class Locked(EnvironmentProblem):
    """Another process holds the run directory or results file this one was asked to write."""


def write_atomic(path: str | Path, write: Callable[[IO], None], mode: str = "wb") -> None:
    """Write `path` whole or not at all: `write(f)` into a temporary file in the same folder, fsync,
    os.replace (atomic on POSIX), then fsync the folder so the rename survives a power cut."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(e, path.parent):
            raise EnvironmentProblem(f"no space left on device writing {path}") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _disk_full(error: BaseException, folder: Path) -> bool:
    """ENOSPC, or torch.save's "file write failed" (a RuntimeError) on a disk with no room left."""
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    return isinstance(error, RuntimeError) and "write failed" in str(error) \
        and os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize < 64 << 20


def remove_temporary(folder: Path, name: str) -> None:
    """The temporary files write_atomic left for `name` in `folder` when a kill stopped it."""
    for tmp in Path(folder).glob(f".{name}.*.tmp"):
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive(path: str | Path) -> Iterator[None]:
    """One process at a time in the block: a blocking flock on `path` (made when missing), which
    the system drops when its holder exits, kill -9 included."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold(path: str | Path, what: str) -> Iterator[None]:
    """An exclusive lock on a run directory (its .lock; a missing folder is made, and removed again
    if nothing else was put in it) or a file (.NAME.lock beside it), for the duration.

    It is flock's: the system drops it when its holder exits, kill -9 included, so a leftover .lock
    file holds nothing. A second process is refused with a Locked error naming the holder.
    """
    path = Path(path)
    made = what == "run directory" and not path.exists()
    if made:
        path.mkdir(parents=True)
    lock = path / ".lock" if path.is_dir() else path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise Locked(f"{what} {path} is in use by {holder}: wait for it to end, or stop it "
                     "(a process that died holds nothing)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
    try:
        yield
    finally:
        if made and {p.name for p in path.iterdir()} == {".lock"}:
            lock.unlink(missing_ok=True)
            path.rmdir()
        os.close(fd)


def content_hash(path: str | Path, length: int = 16) -> str:
    """The sha256 of a file's bytes (hex, the first `length` digits): what a model is, whatever its
    name, path or mtime. `caption --out` records it; the export cache is keyed by it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:length]


def user_cache_dir() -> Path:
    """This user's cache folder: $XDG_CACHE_HOME/captioning, else ~/.cache/captioning."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captioning"
