"""Loading the compiled attention kernels (``minigpt._C``).

Order of attempts, on first use:

1. ``minigpt._C``, built by ``pip install --no-build-isolation -e .`` (setup.py).
2. A just-in-time build of csrc/ with ``torch.utils.cpp_extension.load`` into
   ``$MINIGPT_CACHE_DIR/torch_extensions`` (default ``~/.cache/minigpt``), when the sources are
   present (a source checkout) and ``MINIGPT_NO_JIT`` is not set, with the flags and the CUDA
   decision of setup.py (``minigpt.attention._build``). A lock file left by a killed build is detected and
   removed, so it never hangs a later run.
3. Nothing: ``unavailable_reason()`` says why, and ``minigpt.attention`` falls back to "sdpa".

Loading the module runs its ``TORCH_LIBRARY(minigpt, ...)`` registration, which defines
``torch.ops.minigpt.attention_forward`` and ``attention_backward``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from pathlib import Path
from typing import Optional

from minigpt.attention import _build
from minigpt.runtime import cache_dir

BUILD_HINT = ("Build it with `pip install --no-build-isolation -e .` from a source checkout "
              "(needs a C++ compiler and ninja), or unset MINIGPT_NO_JIT to let minigpt build it "
              "on first use.")

CSRC = _build.CSRC

_lock = threading.Lock()
_on_load: list = []
_module = None
_reason: Optional[str] = None
_info: Optional[dict] = None  # build_info(), read once
_tried = False


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold a lock on build_dir while building (the filelock package: fcntl.flock on POSIX,
    msvcrt.locking on Windows). The OS drops such a lock when its process dies, so unlike
    torch's own lock file it cannot go stale; torch's file, if left by a killed build, is
    removed while we hold ours (nobody else can be building then)."""
    from filelock import FileLock  # a torch dependency

    build_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(build_dir / "minigpt.flock")):
        stale = build_dir / "lock"
        if stale.exists():
            stale.unlink()
        yield


def _jit_build():
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available() and _build.cuda_mode(env) == "auto":
        env["MINIGPT_CUDA"] = "0"  # no GPU to run them on: skip the slow CUDA compile
    plan = _build.build_plan(torch, env)  # sets CUDA_HOME before cpp_extension is imported
    if plan.cpu_reason is not None:
        raise RuntimeError(plan.cpu_reason)
    from torch.utils import cpp_extension

    kw = plan.extension_kwargs()
    build_dir = cache_dir() / "torch_extensions" / (
        f"minigpt_C_torch{torch.__version__.replace('+', '_')}"
        + ("_cuda" if plan.with_cuda else ""))
    with _build_lock(build_dir):
        return cpp_extension.load(
            name="minigpt_C", sources=[str(_build.ROOT / s) for s in kw["sources"]],
            extra_cflags=kw["cxx"], extra_ldflags=kw["ldflags"], extra_cuda_cflags=kw["nvcc"],
            extra_include_paths=kw["include_dirs"], build_directory=str(build_dir),
            with_cuda=plan.with_cuda, verbose=False)


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
    """The compiled module's build information (compiler, OpenMP, vector ISA, CUDA archs) and
    "plan", the line setup.py printed about what it built and why (when setup.py built it)."""
    global _info
    mod = module()
    if mod is None:
        return {}
    if _info is None:
        _info = dict(mod.build_info())
        plan = Path(__file__).parent.parent / "_build_plan.txt"
        if plan.is_file():
            _info["plan"] = plan.read_text(encoding="utf-8").strip()
    return dict(_info)
