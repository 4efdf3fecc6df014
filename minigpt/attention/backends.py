"""The attention backends: one registry (REGISTRY) of (name, function, why-unavailable) from
which attention(), attention_backends(), the command lines' choices, the profiler and the tests
all derive, and the choice among them (resolve_backend).

- "ext": minigpt's compiled kernels (minigpt.attention.op); available where minigpt._C is built
  for the device, dtype, head dim and optional terms (as its build_info() declares), and, on the
  self-checked devices (CUDA), where a first-use check against the float64 reference passed.
- "sdpa": torch.nn.functional.scaled_dot_product_attention; everywhere.
- "naive": the written-out reference (minigpt.attention.reference); everywhere.

The first time "ext" would run on a self-checked device type for a (device, dtype, head dim,
causal, terms) combination, a small forward and backward are compared with the float64
reference by the correctness rule (minigpt.attention.rule). A combination that fails is warned
about once, with the measured errors, and runs on "sdpa" from then on. MINIGPT_SELF_CHECK=0
turns the check off.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from minigpt.attention import _build
from minigpt.attention import _ext
from minigpt.attention import gpu_table
from minigpt.attention import op as ops
from minigpt.attention.reference import causal_mask, naive_attention, repeat_kv, score_bias
from minigpt.attention.rule import within_rule
from minigpt.runtime import bf16_supported

ENV_BACKEND = "MINIGPT_ATTENTION_BACKEND"
_ENV_AUTOCAST = "MINIGPT_CPU_AUTOCAST_ATTENTION"

# What the compiled kernels implement, as minigpt._C's build_info() declares it (csrc/attention.h),
# read once when the module loads: device type -> dtypes, and the CUDA head dims.
_EXT_DTYPES: Dict[str, tuple] = {}
_EXT_CUDA_HEAD_DIMS: tuple = ()
# device type -> the optional score terms its kernels implement ("alibi", "window").
_EXT_FEATURES: Dict[str, tuple] = {}


def _read_kernel_support() -> None:
    """Fill _EXT_DTYPES, _EXT_CUDA_HEAD_DIMS and _EXT_FEATURES from minigpt._C's build_info()."""
    global _EXT_DTYPES, _EXT_CUDA_HEAD_DIMS, _EXT_FEATURES
    info = _ext.build_info()
    _EXT_DTYPES = {device: tuple(getattr(torch, name) for name in names)
                   for device, names in info.get("dtypes", {}).items()}
    _EXT_CUDA_HEAD_DIMS = tuple(info.get("cuda_head_dims", ()))
    _EXT_FEATURES = {device: tuple(names) for device, names in info.get("features", {}).items()}


def features_of(alibi_slopes, window) -> tuple:
    """The optional terms a call uses, as named in build_info()["features"]."""
    return (("alibi",) if alibi_slopes is not None else ()) + \
        (("window",) if window is not None else ())


_ext.on_load(_read_kernel_support)


def _sdpa_attention(q, k, v, causal: bool, scale: float, alibi_slopes=None,
                    window: Optional[int] = None) -> torch.Tensor:
    """The "sdpa" backend on checked inputs: (B, Hq, Tq, D)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    Tq, Tk = q.shape[2], k.shape[2]
    if alibi_slopes is not None or window is not None:
        # A float mask of the (Hq, Tq, Tk) bias: correct, but O(Tq * Tk) memory.
        bias = score_bias(Tq, Tk, causal, alibi_slopes, window, q.device, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    if causal and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    # SDPA's is_causal is aligned top-left when Tq != Tk; ours is bottom-right. A decode step
    # (Tq == 1) sees every key, so it needs no mask at all.
    mask = causal_mask(Tq, Tk, q.device) if causal and Tq > 1 else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# The first-use self-check (see the module docstring): the device types it runs on, and its
# verdicts so far.
_SELF_CHECK_DEVICES = {"cuda"}
_SELF_CHECK_ENV = "MINIGPT_SELF_CHECK"
_self_checks: dict = {}  # key -> None (passed) or the failure, one line


def _self_check(device: torch.device, dtype: torch.dtype, head_dim: int,
                causal: bool, features: tuple = ()) -> Optional[str]:
    """Compare the compiled op with the float64 reference on fresh random inputs (GQA, two key
    tiles and two query tiles of the CUDA backward's 128, Tq != Tk; ALiBi slopes and a window of
    23 keys where features names them). None if every output and gradient meets the rule, else a
    description."""
    g = torch.Generator().manual_seed(20231)
    B, Hq, Hkv, Tq, Tk = 1, 4, 2, 131, 150
    q64 = torch.randn(B, Hq, Tq, head_dim, generator=g, dtype=torch.float64)
    k64 = torch.randn(B, Hkv, Tk, head_dim, generator=g, dtype=torch.float64)
    v64 = torch.randn(B, Hkv, Tk, head_dim, generator=g, dtype=torch.float64)
    dout64 = torch.randn(B, Hq, Tq, head_dim, generator=g, dtype=torch.float64)
    scale = 1.0 / math.sqrt(head_dim)
    slopes = (torch.tensor([0.5, 0.25, 0.0625, 0.0039], device=device)
              if "alibi" in features else None)
    window = 23 if "window" in features and causal else None
    extra = () if slopes is None and window is None else (slopes, window or 0)

    def naive_grads(q, k, v, dout):
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = naive_attention(q, k, v, causal, scale, slopes, window)
        out.backward(dout)
        return out.detach(), q.grad, k.grad, v.grad

    ref = naive_grads(q64, k64, v64, dout64)
    q, k, v, dout = (t.to(device=device, dtype=dtype) for t in (q64, k64, v64, dout64))
    with torch.no_grad():
        out, lse = torch.ops.minigpt.attention_forward(q, k, v, causal, scale, *extra)
        fast = (out,) + tuple(torch.ops.minigpt.attention_backward(dout, q, k, v, out, lse,
                                                                   causal, scale, *extra))
    naive = naive_grads(q, k, v, dout)
    grad_size = max(t.abs().max().item() for t in ref[1:])
    failures = []
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        verdict = within_rule(fast[i], naive[i], ref[i], dtype, None if i == 0 else grad_size)
        if not verdict.ok:
            failures.append(f"{name} error {verdict.error:.3g} > 2 x naive's "
                            f"{verdict.naive_error:.3g}")
    return "; ".join(failures) or None


def _assume_constant_result(fn):
    """torch._dynamo.assume_constant_result (under torch.compile: run fn eagerly and use its
    result as a constant), without importing torch._dynamo, which takes about a second, when
    minigpt is imported: that decorator only marks the function, and dynamo reads the mark when
    it traces. tests/test_platform.py checks that the mark is still the one dynamo sets."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _self_check_failure(key: str) -> Optional[str]:
    """The cached self-check result for key "device|dtype|head_dim|causal|features" (a string:
    dynamo passes only constants to such a function; features joined by "+")."""
    if key not in _self_checks:
        device, dtype, head_dim, causal, features = key.split("|")
        features = tuple(f for f in features.split("+") if f)
        dtype = getattr(torch, dtype.replace("torch.", ""))
        try:
            # The first use may come under no_grad or inference_mode (sampling, profiling): the
            # check differentiates the naive reference, so it runs with autograd on, whatever
            # the caller's mode.
            with torch.inference_mode(False), torch.enable_grad():
                failure = _self_check(torch.device(device), dtype, int(head_dim),
                                      causal == "True", features)
        except RuntimeError as e:  # a kernel that cannot even run fails the check too
            failure = f"the kernels raised {type(e).__name__}: {str(e).splitlines()[0]}"
        if failure is not None:
            failure = (f"the self-check of the compiled kernels failed on {device} for {dtype}, "
                       f"head dim {head_dim}, causal={causal}"
                       f"{', with ' + ' and '.join(features) if features else ''}: {failure}")
            warnings.warn(f"minigpt: {failure}. Using 'sdpa' for this combination "
                          f"(set {_SELF_CHECK_ENV}=0 to skip the check).", RuntimeWarning,
                          stacklevel=2)
        _self_checks[key] = failure
    return _self_checks[key]


@_assume_constant_result
def _gpu_reason(device: str) -> Optional[str]:
    """Why kernels of this build cannot run on the GPU device (compute capability, archs)."""
    capability = torch.cuda.get_device_capability(torch.device(device))
    return _build.gpu_unsupported_reason(capability, _ext.build_info().get("cuda_archs", ""))


@_assume_constant_result
def cuda_default_reason(device: str, dtype: str) -> Optional[str]:
    """Why attention(backend=None) does not pick "ext" on this GPU for this dtype (a string,
    e.g. "torch.bfloat16"), although it may run there: no committed profile shows it at least as
    fast as SDPA (minigpt.attention.gpu_table). None where one does."""
    capability = torch.cuda.get_device_capability(torch.device(device))
    return gpu_table.cuda_default_reason(tuple(capability), dtype.replace("torch.", ""))


def _ext_unavailable_reason(device: torch.device, dtype: torch.dtype,
                            head_dim: Optional[int] = None, causal: Optional[bool] = None,
                            features: tuple = ()) -> Optional[str]:
    """None if the compiled kernels can run on this device, dtype (and head dim, with the
    optional terms in features: "alibi", "window"), else why not. With head_dim and causal
    given, on the devices that are self-checked, the first-use self-check's verdict counts too."""
    why = _ext.unavailable_reason()
    if why is not None:
        return why
    if device.type == "cuda" and "cuda" not in _EXT_DTYPES:
        return "minigpt._C was built without CUDA kernels"
    supported = _EXT_DTYPES.get(device.type)
    if not supported:
        return f"the compiled kernels do not support device type '{device.type}'"
    if dtype not in supported:
        names = ", ".join(str(d).replace("torch.", "") for d in supported)
        return f"the compiled kernels on {device.type} support {names}, not {dtype}"
    if device.type == "cuda" and head_dim is not None and head_dim not in _EXT_CUDA_HEAD_DIMS:
        return f"the CUDA kernels support head dims {_EXT_CUDA_HEAD_DIMS}, not {head_dim}"
    missing = [f for f in features if f not in _EXT_FEATURES.get(device.type, ())]
    if missing:
        return f"the compiled kernels on {device.type} do not implement {' or '.join(missing)}"
    if device.type == "cuda":
        why = _gpu_reason(str(device))
        if why is not None:
            return why
    if (device.type in _SELF_CHECK_DEVICES and head_dim is not None and causal is not None
            and os.environ.get(_SELF_CHECK_ENV, "1") != "0"):
        return _self_check_failure(f"{device}|{dtype}|{head_dim}|{causal}|{'+'.join(features)}")
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of the attention contract.

    fn(q, k, v, causal, scale, alibi_slopes, window) -> out takes checked inputs (see
    attention(); alibi_slopes already float32, window None or >= 1); unavailable(device, dtype,
    head_dim, causal, features=()) -> None where it can run, else why not (head_dim and causal
    may be None: "for some head dim"; features: the optional terms used, "alibi", "window").
    """

    name: str
    fn: Callable[..., torch.Tensor]
    unavailable: Callable[..., Optional[str]]
    summary: str


def _always(device, dtype, head_dim=None, causal=None, features=()) -> Optional[str]:
    """The availability of the PyTorch backends: everywhere torch runs."""
    return None


# The table every list of backends derives from: attention(), attention_backends(), the train
# and profile command lines' choices, and the tests' parametrisation. The order is the order of
# preference when none is asked for (ext where available, else sdpa; naive only on request).
REGISTRY: Dict[str, Backend] = {b.name: b for b in (
    Backend("ext", ops.ext_attention, _ext_unavailable_reason,
            "minigpt's compiled kernels (minigpt._C), FlashAttention-2 style"),
    Backend("sdpa", _sdpa_attention, _always,
            "torch.nn.functional.scaled_dot_product_attention"),
    Backend("naive", naive_attention, _always,
            "the explicit softmax(QK^T/sqrt(D))V reference"),
)}
BACKENDS = tuple(REGISTRY)


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype,
                       head_dim: Optional[int] = None, causal: Optional[bool] = None,
                       features: tuple = ()) -> Optional[str]:
    """None if backend name can run on this device, dtype (and head dim, with the optional
    terms in features: "alibi", "window"), else why not.

    Raises:
        ValueError: an unknown backend name.
    """
    if name not in REGISTRY:
        raise ValueError(f"attention: backend must be one of {BACKENDS}, got {name!r}")
    return REGISTRY[name].unavailable(device, dtype, head_dim, causal, features)


def available_backends(device: torch.device, dtype: torch.dtype,
                       head_dim: Optional[int] = None) -> List[str]:
    """The names of the backends that can run on this device and dtype, in REGISTRY's order."""
    return [name for name in BACKENDS if unavailable_reason(name, device, dtype, head_dim) is None]


_warned_fallback = False


def resolve_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype,
                    head_dim: Optional[int] = None, causal: Optional[bool] = None,
                    features: tuple = ()) -> str:
    """The backend attention() runs for tensors of this device, dtype and head dim: backend
    itself if given (else $MINIGPT_ATTENTION_BACKEND), "ext" where available and, on CUDA,
    measured at least as fast as SDPA for the GPU's compute capability and this dtype
    (minigpt.attention.gpu_table), else "sdpa".

    Raises:
        ValueError: an unknown backend name.
        RuntimeError: "ext" asked for where it is not available; the message says why.
    """
    global _warned_fallback
    requested = backend if backend is not None else os.environ.get(ENV_BACKEND) or None
    if requested is not None and requested not in BACKENDS:
        source = "backend" if backend is not None else f"${ENV_BACKEND}"
        raise ValueError(f"attention: {source} must be one of {BACKENDS} or None, "
                         f"got {requested!r}")
    if requested == "ext":
        why = _ext_unavailable_reason(device, dtype, head_dim, causal, features)
        if why is not None:
            hint = f" {_ext.BUILD_HINT}" if _ext.unavailable_reason() is not None else ""
            raise RuntimeError(f"attention: backend 'ext' is not available: {why}.{hint}")
        return "ext"
    if requested is not None:
        return requested
    # On CUDA, "ext" is the default only where it was measured at least as fast as SDPA; checked
    # first, so that the self-check does not run for a backend that would not be picked.
    why = cuda_default_reason(str(device), str(dtype)) if device.type == "cuda" else None
    if why is None:
        why = _ext_unavailable_reason(device, dtype, head_dim, causal, features)
        if why is None:
            return "ext"
    build_why = _ext.unavailable_reason()
    if build_why is not None and not _warned_fallback:
        # Only a missing/broken build is worth a warning; an unsupported dtype is by design.
        _warned_fallback = True
        warnings.warn(f"minigpt: compiled attention unavailable ({build_why}); using 'sdpa'. "
                      f"{_ext.BUILD_HINT}", RuntimeWarning, stacklevel=3)
    return "sdpa"


def cpu_autocast_dtype(dtype: torch.dtype, backend: Optional[str] = None) -> torch.dtype:
    """The dtype attention() computes bfloat16/float16 CPU inputs in under torch.autocast("cpu"),
    for the backend asked for (None: the default): bfloat16 for bfloat16 inputs where that
    backend is "ext" and the CPU has bf16 dot-product instructions (runtime.bf16_supported:
    AVX512_BF16 or AMX); float32 otherwise (and the output is float32, as autocast does for its
    float32 ops: softmax, layer_norm). $MINIGPT_CPU_AUTOCAST_ATTENTION=float32 keeps float32
    everywhere ("bfloat16", the default, may be given too). bfloat16 is the default because it
    was measured faster end to end: a step of the default training run takes 0.90-0.93x the
    time with float32 attention, on an AMD EPYC (Zen 4, AVX512_BF16, 2 threads), with the
    QK-norm + RoPE op writing bfloat16 for it, at the same loss (docs/kernels.md,
    docs/training.md). float16 is always computed in float32. The model calls this too, to
    cast its projections once."""
    wanted = os.environ.get(_ENV_AUTOCAST, "").strip().lower()
    if wanted not in ("", "float32", "bfloat16"):
        raise ValueError(f"${_ENV_AUTOCAST} must be float32 or bfloat16, got {wanted!r}")
    cpu = torch.device("cpu")
    if wanted != "float32" and dtype == torch.bfloat16 and bf16_supported(cpu):
        try:
            if resolve_backend(backend, cpu, dtype) == "ext":
                return dtype
        except RuntimeError:  # "ext" forced where it cannot run: attention() says so
            return dtype
    return torch.float32
