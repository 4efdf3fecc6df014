"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts saved with torch.save. It is
written to a temporary file in the same directory, flushed and fsynced, then renamed over the
target (os.replace is atomic on POSIX), and the directory is fsynced: a crash or Ctrl-C at any
moment leaves either the previous checkpoint or the new one, never a torn file. It is read with
torch.load(weights_only=True), which refuses pickled code.

A write that fails for a reason of the file system (disk full, read-only, permission denied)
raises OSError naming the target path and its errno, however deep in torch.save it happened
(torch wraps such an error in a RuntimeError from its zip writer), and leaves the previous file
whole. New files get the permissions the umask gives (as open() would), not mkstemp's 0600; a
replaced file keeps its own.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import torch


class CheckpointError(Exception):
    """A checkpoint file is missing, truncated, corrupted or not a minigpt checkpoint."""


REQUIRED_KEYS = ("model", "model_config", "tokenizer")


def _file_mode(path: Path) -> int:
    """The mode a plain open(path, "w") would leave: the existing file's, else 0o666 less the
    umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _os_error_in(e: BaseException) -> Optional[OSError]:
    """The OSError e is, or was raised from or while handling (torch.save wraps one)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def atomic_write(path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(fh) on a temporary file beside path, fsync it, rename it over path and fsync
    the directory: readers (and a crash at any moment) see the old file or the new one, never a
    partial one. Temporary files left by a writer that was killed are removed first.

    Raises:
        OSError: the file system refused (ENOSPC, EROFS, EACCES, ...): with filename = path
            (or the directory it failed to make) and the original errno; path is unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, e.filename or str(path)) from None
    try:
        if hasattr(os, "fchmod"):  # POSIX; mkstemp made it 0600
            os.fchmod(fd, _file_mode(path))
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error_in(e)
        if cause is not None and not isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from None
        raise
    if os.name == "nt":  # Windows cannot open a directory to fsync it; its rename is durable
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path, text: str) -> None:
    """Write text (UTF-8) to path atomically (atomic_write)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda fh: fh.write(data))


def save_checkpoint(state: dict, path) -> None:
    """Atomically write state to path with torch.save (see atomic_write)."""
    atomic_write(path, lambda fh: torch.save(state, fh))


def checkpoint_file(path) -> Path:
    """path itself, or path/ckpt.pt when path is a directory holding one."""
    path = Path(path)
    return path / "ckpt.pt" if path.is_dir() and (path / "ckpt.pt").is_file() else path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by save_checkpoint; path may be a directory holding ckpt.pt.

    Raises:
        CheckpointError: with a one-line message naming the file, if it does not exist, is a
            directory or another non-regular file (a FIFO), cannot be unpickled safely
            (truncated, corrupted, foreign), or lacks the keys of a minigpt checkpoint.
    """
    path = checkpoint_file(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: is a directory without a ckpt.pt")
    if not path.is_file():  # a FIFO or a device: reading it could block for ever
        raise CheckpointError(f"checkpoint {path}: not a regular file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path}: cannot be read (truncated, corrupted or not "
                              f"a minigpt checkpoint): {first}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"checkpoint {path}: not a minigpt checkpoint (expected a dict "
                              f"with keys {', '.join(REQUIRED_KEYS)})")
    return state
