"""A run directory (out_dir) belongs to one training run at a time.

Two things go wrong without this: a new run started into a directory that holds another run's
checkpoint replaces it at its first evaluation, and two runs started into one directory at the
same time race on ckpt.pt (each one's stale-temporary cleanup deletes the other's half-written
file) and interleave their metrics.jsonl lines.

RunDir holds an OS file lock on out_dir/run.lock (the filelock package: fcntl.flock on POSIX,
msvcrt.locking on Windows). The OS drops such a lock when its process dies, so a killed run
never leaves the directory stuck. The holder writes its pid, host and start time to
out_dir/run.lock.owner so that a second run can say who holds the directory.

While it runs, a run asks lost() between steps: the directory or its lock file deleted or
replaced (rm -rf out while training) means the lock no longer keeps anyone out, and the run's
files are gone; the run saves what it has and stops (minigpt.train.loop). A run that fails before
it writes anything removes the directory it created, so a refused or failed start leaves no
trace.

This is a low module: it imports nothing of minigpt.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = "run.lock"
OWNER_NAME = "run.lock.owner"
CHECKPOINT_NAME = "ckpt.pt"


class RunDirError(Exception):
    """out_dir cannot be used for this run: another process holds it, or it holds another run's
    checkpoint and the run neither resumes nor overwrites it. The message says what to do."""


class RunDirLostError(RuntimeError):
    """The run directory or its lock vanished while the run held it; the message says where the
    run saved its checkpoint."""


class RunDir:
    """Exclusive use of a run directory for the duration of a ``with`` block.

        with RunDir("out", resume=False, overwrite=False):
            ...  # train, write out/ckpt.pt and out/metrics.jsonl

    Args:
        path: the run directory; created if missing.
        resume: the run continues the checkpoint in path (so one may exist).
        overwrite: the run may replace a checkpoint in path that it does not resume.

    Raises (on entering):
        RunDirError: another live process holds path (its pid, host and start time are named),
            or path holds a checkpoint and neither resume nor overwrite is set.
    """

    def __init__(self, path, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.resume, self.overwrite = resume, overwrite
        self._lock = None
        self._lock_id = None
        self._created = None  # the outermost directory this RunDir created, if any

    def __enter__(self) -> "RunDir":
        from filelock import FileLock, Timeout  # a torch dependency

        missing = Path(os.path.abspath(self.path))
        while not missing.parent.exists() and missing.parent != missing:
            missing = missing.parent
        self._created = None if missing.exists() else missing
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / LOCK_NAME), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunDirError(f"run directory {self.path} is in use by another training run "
                              f"({self._owner() or 'a process that has not named itself yet'});"
                              f" wait for it to finish, or train into another out_dir") from None
        self._lock = lock
        try:
            self._lock_id = self._identity()
            self._check_checkpoint()
            (self.path / OWNER_NAME).write_text(
                f"process {os.getpid()} on {socket.gethostname()}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n", encoding="utf-8")
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._release()
        if exc_type is not None:
            self._remove_if_created_and_empty()

    def _identity(self):
        st = os.stat(self.path / LOCK_NAME)
        return st.st_dev, st.st_ino

    def lost(self) -> Optional[str]:
        """None while the directory and the lock this RunDir holds are in place; else what
        happened, in words ("run directory out was deleted")."""
        if self._lock is None:
            return None
        if not self.path.is_dir():
            return f"run directory {self.path} was deleted"
        try:
            same = self._identity() == self._lock_id
        except OSError:
            same = False
        if not same:
            return f"the lock {self.path / LOCK_NAME} was deleted or replaced"
        return None

    def _release(self) -> None:
        if self._lock is not None:
            if not self.lost():  # never delete another holder's files
                (self.path / OWNER_NAME).unlink(missing_ok=True)
            try:
                self._lock.release()
            except OSError:
                pass
            self._lock = None

    def _remove_if_created_and_empty(self) -> None:
        """After a failed start: remove what __enter__ created, if nothing else was put in it
        (the lock file aside)."""
        if self._created is None:
            return
        try:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            path = Path(os.path.abspath(self.path))
            while True:
                path.rmdir()  # only if empty
                if path == self._created or path == path.parent:
                    break
                path = path.parent
        except OSError:
            pass

    def _owner(self) -> Optional[str]:
        try:
            return (self.path / OWNER_NAME).read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def _check_checkpoint(self) -> None:
        ckpt = self.path / CHECKPOINT_NAME
        if ckpt.exists() and not (self.resume or self.overwrite):
            raise RunDirError(
                f"run directory {self.path} holds another run's checkpoint ({ckpt}); to keep "
                f"it, continue that run (resume, --resume) or train into another out_dir "
                f"(--out-dir DIR); to replace it, pass overwrite (--overwrite)")
