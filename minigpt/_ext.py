"""Loading the compiled attention kernels (``minigpt._C``).

Order of attempts, on first use:

1. ``minigpt._C``, built by ``pip install --no-build-isolation -e .`` (setup.py).
2. A just-in-time build of csrc/ with ``torch.utils.cpp_extension.load`` into
   ``$MINIGPT_CACHE_DIR/torch_extensions`` (default ``~/.cache/minigpt``), when the sources are
   present (a source checkout) and ``MINIGPT_NO_JIT`` is not set. A lock file left by a killed
   build is detected and removed, so it never hangs a later run.
3. Nothing: ``unavailable_reason()`` says why, and ``minigpt.attention`` falls back to "sdpa".

Loading the module runs its ``TORCH_LIBRARY(minigpt, ...)`` registration, which defines
``torch.ops.minigpt.attention_forward`` and ``attention_backward``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import threading
from pathlib import Path
from typing import Optional

BUILD_HINT = ("Build it with `pip install --no-build-isolation -e .` from a source checkout "
              "(needs a C++ compiler and ninja), or unset MINIGPT_NO_JIT to let minigpt build it "
              "on first use.")

_ROOT = Path(__file__).resolve().parent.parent
CSRC = _ROOT / "csrc"

# Flags shared with setup.py: at::parallel_for needs OpenMP to run on more than one thread.
CXX_FLAGS = ["-O3", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr"]

_lock = threading.Lock()
_on_load: list = []
_module = None
_reason: Optional[str] = None
_tried = False


def cache_dir() -> Path:
    """minigpt's cache directory: $MINIGPT_CACHE_DIR, default ~/.cache/minigpt."""
    return Path(os.environ.get("MINIGPT_CACHE_DIR") or Path.home() / ".cache" / "minigpt")


def sources(with_cuda: bool) -> list:
    """The extension's source files, found by glob (never listed by hand)."""
    files = sorted(str(p) for p in CSRC.glob("*.cpp"))
    if with_cuda:
        files += sorted(str(p) for p in (CSRC / "cuda").glob("*.cpp"))
        files += sorted(str(p) for p in (CSRC / "cuda").glob("*.cu"))
    return files


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold an flock on build_dir while building. The kernel drops an flock when its process
    dies, so unlike torch's own lock file it cannot go stale; torch's file, if left by a killed
    build, is removed while we hold ours (nobody else can be building then)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "minigpt.flock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                stale.unlink()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _jit_build():
    import torch
    from torch.utils import cpp_extension

    with_cuda = (torch.cuda.is_available() and torch.version.cuda is not None
                 and cpp_extension.CUDA_HOME is not None and (CSRC / "cuda").is_dir())
    srcs = sources(with_cuda)
    cflags = list(CXX_FLAGS)
    if with_cuda:
        cflags.append("-DMINIGPT_WITH_CUDA")
    build_dir = cache_dir() / "torch_extensions" / (
        f"minigpt_C_torch{torch.__version__.replace('+', '_')}" + ("_cuda" if with_cuda else ""))
    with _build_lock(build_dir):
        return cpp_extension.load(
            name="minigpt_C", sources=srcs, extra_cflags=cflags, extra_ldflags=LD_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS + (["-DMINIGPT_WITH_CUDA"] if with_cuda else []),
            extra_include_paths=[str(CSRC)], build_directory=str(build_dir), verbose=False)


def _try_load(jit: bool):
    """(module, None) on success, else (None, reason)."""
    try:
        return importlib.import_module("minigpt._C"), None
    except ImportError as e:
        why = f"minigpt._C is not built ({e})"
    if not jit:
        return None, why
    if os.environ.get("MINIGPT_NO_JIT"):
        return None, f"{why}; the just-in-time build is disabled by MINIGPT_NO_JIT"
    if not (CSRC / "bindings.cpp").is_file():
        return None, f"{why}; no C++ sources to build from at {CSRC}"
    try:
        return _jit_build(), None
    except Exception as e:  # a compiler error, missing ninja, ...: report, don't crash
        msg = str(e).strip().splitlines()
        return None, f"{why}; the just-in-time build failed: {msg[-1] if msg else type(e).__name__}"


def _load(jit: bool):
    global _module, _reason, _tried
    _module, _reason = _try_load(jit)
    _tried = jit or _module is not None  # a failed import without JIT is retried with it
    if _module is not None:
        for hook in _on_load:
            hook()


def on_load(hook) -> None:
    """Call hook() once the extension is loaded (now, if it already is): the Python side
    registers the ops' fake and autograd formulas this way, before any op can be called."""
    _on_load.append(hook)
    if _module is not None:
        hook()


def module(jit: bool = True):
    """The loaded extension module, or None (see unavailable_reason()). With jit=False only an
    already-built minigpt._C is imported (cheap; done when minigpt is imported)."""
    if not _tried:  # checked before taking the lock, so torch.compile traces no lock once loaded
        with _lock:
            if not _tried:
                _load(jit)
    return _module


def unavailable_reason() -> Optional[str]:
    """None if the compiled kernels are loaded, else a one-line reason."""
    module()
    return _reason


def build_info() -> dict:
    """The compiled module's build information (compiler, OpenMP, vector ISA, CUDA archs)."""
    mod = module()
    return dict(mod.build_info()) if mod is not None else {}
