"""Runtime helpers shared by the library and its command lines: the cache directory, the checks
of file-system targets made before any work starts, OS errors as one line, the quiet ending of a
command line on Ctrl-C or a closed pipe, its process's memory and exit settings, the choice of
device, the training/inference precision a device supports, and the distributed setup that
torchrun describes.

This is a low module: it imports torch and nothing of minigpt.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import functools
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


class DeviceError(ValueError):
    """A device or precision that this machine cannot provide; the message names what it can."""


class PathError(ValueError):
    """A file-system target that cannot be used (a directory that is a file, a read-only or
    unwritable place, a corpus that is not a regular readable file); the message names the
    argument, the path and why."""


def cache_dir() -> Path:
    """minigpt's cache directory: $MINIGPT_CACHE_DIR, default ~/.cache/minigpt."""
    return Path(os.environ.get("MINIGPT_CACHE_DIR") or Path.home() / ".cache" / "minigpt")


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable_place(what: str, path: Path, existing: Path) -> None:
    if not existing.is_dir():
        raise PathError(f"{what} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        ro = _read_only_fs(existing)
        raise PathError(f"{what} {path}: {existing} is "
                        + ("on a read-only file system" if ro else "not writable (permission "
                                                                   "denied)"))


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False


def check_dir_target(path, what: str) -> Path:
    """Check, without creating anything, that path can be made or used as a directory that this
    process writes into: it is a directory (or does not exist yet), and the directory it is or
    will be created in is writable.

    Args:
        path: the directory.
        what: the argument, for the message ("out_dir", "--out").

    Raises:
        PathError: path is a file (or another non-directory), or the place is not writable or
            on a read-only file system.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PathError(f"{what} {path}: exists and is not a directory")
    _writable_place(what, path, _nearest_existing(path))
    return path


def check_file_target(path, what: str, make_parents: bool = False) -> Path:
    """Check, without creating anything, that a file can be written at path: path is not a
    directory (an existing regular file is replaced), and its directory exists (or, with
    make_parents, can be made) and is writable.

    Raises:
        PathError: path is a directory or a special file, its directory is missing (without
            make_parents), or its place is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise PathError(f"{what} {path}: is a directory; give a file name")
    if path.exists() and not path.is_file():
        raise PathError(f"{what} {path}: is not a regular file")
    parent = Path(os.path.abspath(path)).parent
    if not make_parents and not parent.exists():
        raise PathError(f"{what} {path}: the directory {parent} does not exist")
    _writable_place(what, path, _nearest_existing(parent))
    return path


def check_input_file(path, what: str) -> Path:
    """Check that path is a regular file this process can read (a FIFO, a device or a directory
    is refused: reading a FIFO would block for ever).

    Raises:
        PathError: naming what and path: missing, not a regular file, or not readable.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise PathError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise PathError(f"{what} {path}: {os_error_reason(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise PathError(f"{what} {path}: is a directory; give a file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        raise PathError(f"{what} {path}: is {kind}; give a regular file")
    if not os.access(path, os.R_OK):
        raise PathError(f"{what} {path}: not readable (permission denied)")
    return path


def check_cache_dir() -> Path:
    """cache_dir(), checked as a writable directory target (MINIGPT_CACHE_DIR may name a file).

    Raises:
        PathError: naming MINIGPT_CACHE_DIR when it is set, else the default path.
    """
    what = "MINIGPT_CACHE_DIR" if os.environ.get("MINIGPT_CACHE_DIR") else "cache directory"
    return check_dir_target(cache_dir(), what)


def os_error_reason(e: OSError) -> str:
    """The cause of an OSError in words with its errno name: "No space left on device
    (ENOSPC)"."""
    name = errno.errorcode.get(e.errno or 0)
    text = e.strerror or str(e) or type(e).__name__
    return f"{text} ({name})" if name else text


def os_error_message(e: OSError) -> str:
    """One line naming the path(s) of an OSError and its cause: "out/ckpt.pt: No space left on
    device (ENOSPC)"."""
    if e.filename is None:
        return os_error_reason(e)
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    return f"{where}: {os_error_reason(e)}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line errors: "prog: error: argument --seed: ... (see prog
    --help)", exit code 2, without the usage block (which for train.py's ~60 flags buries
    the error). --help appends each flag's default, "(default: X)", unless formatter_class says
    otherwise (train.py writes its own: its defaults resolve after parsing)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def out_of_memory(e: BaseException) -> bool:
    """Whether e is an allocation failure: MemoryError, torch's OutOfMemoryError (CUDA, MPS),
    or the CPU allocator's RuntimeError ("can't allocate memory")."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5
    return isinstance(e, (MemoryError, oom)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def cli_main(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command line's main(argv) -> exit code so that ordinary events end it quietly:
    Ctrl-C (KeyboardInterrupt) prints one line and returns 130 (128 + SIGINT); a closed output
    pipe (BrokenPipeError, e.g. ``| head``) returns 141 (128 + SIGPIPE) with nothing printed,
    stdout pointed at /dev/null so that the interpreter's final flush cannot raise again; an
    allocation failure (sizes too large for this machine) prints one line and returns 1.
    A process that ran one keeps freed memory for reuse (keep_freed_memory). The garbage
    collector is left as it is: freezing it at exit (gc.freeze) ended a command about 0.2 s
    sooner, but kept every live object alive through the interpreter's shutdown, where
    extension modules that check for leaks then (triton's, which a CUDA build of torch loads,
    through nanobind) printed dozens of lines of leak reports."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        keep_freed_memory()
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            _quiet_stdout()
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            _quiet_stdout()
            return 141
        except (MemoryError, RuntimeError) as e:
            if not out_of_memory(e):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"error: out of memory ({first}); try smaller sizes", file=sys.stderr)
            return 1

    return wrapper


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Have glibc's malloc keep the memory that tensors free, for the next step's tensors.

    By default glibc serves a block of more than 128 KiB-32 MiB (a threshold it adapts) with
    fresh pages from the kernel and gives the heap's free top back beyond a few MiB, so training
    steps fault their activations' pages in again, zeroed, step after step. With blocks up to
    mmap_threshold bytes taken from the heap and its free top kept up to trim_threshold bytes
    (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), the default `python train.py` (AMD EPYC, 2
    threads) took 97,000 page faults and 1.1 s of system time instead of 2.8-3.3 million and
    7.3-7.7 s, and a loop of its 8 x 256 steps alone took 0.89x the time (10 alternated pairs).
    The cost: a process keeps up to trim_threshold bytes that it freed.

    Applied by every minigpt command line (cli_main); call it in your own process for the same
    effect. Leaves malloc alone where the environment tunes it already (a MALLOC_* variable, or
    GLIBC_TUNABLES naming malloc), and off glibc (returns False there).

    Args:
        mmap_threshold: bytes; blocks up to this size come from the heap (glibc accepts at most
            32 MiB on 64-bit systems).
        trim_threshold: bytes of the heap's free top kept before any is given back.

    Returns:
        whether both settings were applied.
    """
    if sys.platform != "linux" or any(name.startswith("MALLOC_") for name in os.environ) \
            or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library symbols, or not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return (mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
            and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1)


def _quiet_stdout() -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def available_devices() -> List[str]:
    """Device names this process can use, e.g. ["cpu"], ["cpu", "cuda", "cuda:1"], ["cpu", "mps"]."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(1, torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def pick_device(name: str = "auto") -> torch.device:
    """The torch.device for name: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1",
    "mps", ...

    Raises:
        DeviceError: an unknown name or a device that is not available here, in one line naming
            the devices that are (e.g. "--device cuda" with a CPU-only torch).
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    have = ", ".join(available_devices())
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {name!r} is not a device name; available here: {have}, "
                          f"or auto") from None
    if device.type == "cuda":
        ok = torch.cuda.is_available() and (device.index is None
                                            or device.index < torch.cuda.device_count())
        if not ok:
            why = ("this torch has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise DeviceError(f"device {name!r} is not available ({why}); available here: "
                              f"{have}, or auto")
    elif device.type == "mps" and not _mps_available():
        raise DeviceError(f"device {name!r} is not available; available here: {have}, or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {name!r} is not supported by minigpt; available here: {have}, "
                          f"or auto")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is worth using on device: CUDA GPUs with native bf16 (compute
    capability 8.0+; T4 and V100 have none), and CPUs with bf16 dot-product instructions
    (AVX512_BF16: AMD Zen 4+, Intel Cooper Lake+; or AMX: Intel Sapphire Rapids+), where
    torch's bf16 matmuls run about 2.5x the float32 rate. Elsewhere (MPS, Arm, older x86)
    False: bf16 is emulated there and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


@dataclass
class Precision:
    """How a device trains: the autocast dtype (None: plain float32) and whether a gradient
    scaler is needed (float16 underflows small gradients without one; Micikevicius et al. 2018)."""

    name: str                        # "float32", "bfloat16" or "float16"
    autocast_dtype: Optional[torch.dtype]
    device_type: str

    @property
    def needs_grad_scaler(self) -> bool:
        return self.autocast_dtype is torch.float16

    def autocast(self):
        """The autocast context for forward passes (a no-op for float32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> "torch.amp.GradScaler":
        """A GradScaler, enabled only for float16."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_grad_scaler)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The precision for --dtype name on device.

    "auto": bf16 autocast on CUDA GPUs that support it, float16 autocast with a GradScaler on
    older CUDA GPUs; on the CPU bf16 autocast where the CPU has bf16 instructions
    (bf16_supported), else float32; float32 on MPS. "bfloat16" or "float16" force that autocast
    dtype; "float32" turns autocast off. Under autocast the weights, optimizer and gradients
    stay float32; matmuls run in the autocast dtype (Micikevicius et al. 2018).

    Raises:
        DeviceError: an unknown name, or "bfloat16" on a CUDA GPU without bf16.
    """
    if name not in DTYPES:
        raise DeviceError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            name = "bfloat16" if bf16_supported(device) else "float16"
        else:
            name = "bfloat16" if bf16_supported(device) else "float32"
    elif name == "bfloat16" and device.type == "cuda" and not bf16_supported(device):
        raise DeviceError(f"dtype 'bfloat16' is not supported on {device} (compute capability "
                          f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}); "
                          f"use float16 or auto")
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    return Precision(name, dtype, device.type)


class Distributed:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): this process's rank, the world
    size, and the process group when there is more than one process (NCCL on CUDA, else gloo).
    One process without torchrun: rank 0 of 1, nothing initialised."""

    def __init__(self, device: torch.device):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)

    @staticmethod
    def is_master_process() -> bool:
        """Whether this process is rank 0 (or runs alone), readable before any setup."""
        return int(os.environ.get("RANK", "0")) == 0

    @property
    def master(self) -> bool:
        return self.rank == 0

    def device_for(self, device: torch.device) -> torch.device:
        """device, or with several CUDA processes this process's GPU (cuda:LOCAL_RANK), made
        current."""
        if self.enabled and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def any(self, flag: bool) -> bool:
        """True if flag is true on any rank, so that every rank takes the same branch."""
        if not self.enabled:
            return flag
        t = self._reducible(torch.tensor([1.0 if flag else 0.0]))
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    @staticmethod
    def _reducible(t: torch.Tensor) -> torch.Tensor:
        """t where the backend reduces: a CUDA copy of a CPU t with nccl, else t itself."""
        return t.cuda() if torch.distributed.get_backend() == "nccl" and not t.is_cuda else t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over every rank, in place (t itself when alone)."""
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t

    def mean(self, t: torch.Tensor) -> float:
        """The mean over every rank of the 1-element t, as a float: t's own value when alone (a
        CPU t is reduced on the GPU with nccl)."""
        return self.sum(self._reducible(t) if self.enabled else t).item() / self.world_size

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing when alone)."""
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
