"""Scaled dot-product attention with a choice of backends.

    attention(q, k, v, *, causal=True, scale=None, alibi_slopes=None, window=None,
              backend=None) -> out

    out = softmax(scale * q @ k^T + bias + mask) @ v      (Vaswani et al. 2017, eq. 1)

bias is ALiBi's linear distance penalty (Press et al. 2022, "Train Short, Test Long", sec. 3):
head h adds -alibi_slopes[h] * (i' - j) to the score of query i and key j, where i' = i + (Tk - Tq)
is the query's position aligned bottom-right with the keys. mask is the causal mask and, with
window=W, the sliding window (Beltagy et al. 2020, "Longformer"; Child et al. 2019): query i sees
keys i' - W < j <= i', the W most recent keys, itself included.

Backends:

- ``"ext"``   our compiled kernels (C++ on CPU, CUDA on GPU; ``minigpt._C``), FlashAttention-2
  style (Dao 2023, Alg. 1 and 2): tiled, online softmax, memory linear in T. Bound as the
  custom ops ``torch.ops.minigpt.attention_forward`` / ``attention_backward`` with fake (meta)
  and autograd formulas registered in minigpt.attention.op, so ``torch.compile`` and
  ``torch.library.opcheck`` work.
- ``"sdpa"``  PyTorch's ``torch.nn.functional.scaled_dot_product_attention``.
- ``"naive"`` the readable reference: the explicit softmax(QK^T / sqrt(D)) V below. It builds
  the full (Tq, Tk) score matrix; tests compare every fast path against it in float64.

The causal mask is aligned bottom-right: query i (0-based, of Tq) sees keys j <= i + (Tk - Tq).
With Tq == Tk that is the usual lower triangle; with Tq == 1 it is a decode step that sees the
whole KV cache. Example, Tq = 2, Tk = 5 (1 = attended)::

    1 1 1 1 0
    1 1 1 1 1

and the same with window=2::

    0 0 1 1 0
    0 0 0 1 1
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
from minigpt.runtime import bf16_supported

__all__ = ["attention", "attention_backends", "BACKENDS", "Backend", "REGISTRY",
           "resolve_backend", "unavailable_reason", "available_backends"]

_ENV_BACKEND = "MINIGPT_ATTENTION_BACKEND"
_ENV_AUTOCAST = "MINIGPT_CPU_AUTOCAST_ATTENTION"

# What the compiled kernels implement, as minigpt._C's build_info() declares it (csrc/attention.h),
# read once when the module loads: device type -> dtypes, and the CUDA head dims.
_EXT_DTYPES: Dict[str, tuple] = {}
_EXT_CUDA_HEAD_DIMS: tuple = ()
# device type -> the optional score terms its kernels implement ("alibi", "window").
_EXT_FEATURES: Dict[str, tuple] = {}


def _read_kernel_support() -> None:
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


def _describe(name: str, t: torch.Tensor) -> str:
    return f"{name} of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_inputs(q, k, v, causal, scale, alibi_slopes=None, window=None) -> None:
    """Validate the contract of docs/design.md once, before any kernel runs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"attention: {name} must be 4-d (B, H, T, D), got {_describe(name, t)}")
        if not t.is_floating_point():
            raise TypeError(
                f"attention: {name} must have a floating dtype, got {_describe(name, t)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"attention: q and {name} must have the same dtype, got "
                            f"{_describe('q', q)} and {_describe(name, t)}")
        if t.device != q.device:
            raise ValueError(f"attention: q and {name} must be on the same device, got "
                             f"{_describe('q', q)} and {_describe(name, t)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got "
                         f"{_describe('k', k)} and {_describe('v', v)}")
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"attention: k must have q's batch size and head dim, got "
                         f"{_describe('q', q)} and {_describe('k', k)}")
    Hkv, Tk = k.shape[1], k.shape[2]
    if Hq == 0:
        raise ValueError(f"attention: q must have at least one head, got {_describe('q', q)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"attention: the number of query heads ({Hq}) must be a multiple of "
                         f"the number of key/value heads ({Hkv}); got {_describe('q', q)} and "
                         f"{_describe('k', k)}")
    if D == 0:
        raise ValueError(f"attention: head dim must be positive, got {_describe('q', q)}")
    if causal and Tq > Tk:
        raise ValueError(f"attention: causal attention needs Tq <= Tk (the mask is aligned "
                         f"bottom-right), got Tq={Tq} from {_describe('q', q)} and Tk={Tk} from "
                         f"{_describe('k', k)}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)
                                  and scale > 0):
        raise ValueError(f"attention: scale must be a positive finite number, got {scale!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"attention: alibi_slopes must be a torch.Tensor or None, got "
                            f"{type(alibi_slopes).__name__}")
        if alibi_slopes.shape != (Hq,) or not alibi_slopes.is_floating_point():
            raise ValueError(f"attention: alibi_slopes must be a floating (Hq,) = ({Hq},) "
                             f"tensor, one slope per query head, got "
                             f"{_describe('alibi_slopes', alibi_slopes)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"attention: alibi_slopes must be on q's device {q.device}, got "
                             f"{_describe('alibi_slopes', alibi_slopes)}")
        # A NaN or infinite slope makes every score of its head NaN (the kernels would return
        # NaN rows silently). Checked on real tensors only: not while tracing.
        if (alibi_slopes.device.type != "meta" and not torch.compiler.is_compiling()
                and not bool(torch.isfinite(alibi_slopes).all())):
            raise ValueError(f"attention: alibi_slopes must be finite, got "
                             f"{alibi_slopes.tolist()}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"attention: window must be a positive int (the number of most "
                             f"recent keys a query sees, itself included) or None, got {window!r}")
        if not causal:
            raise ValueError("attention: window needs causal=True (the window is the W most "
                             f"recent keys under the causal mask), got window={window} with "
                             "causal=False")


def slopes_for(alibi_slopes: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """alibi_slopes as the kernels take them: float32, contiguous (None stays None). The slopes
    are constants: no gradient flows to them."""
    if alibi_slopes is None:
        return None
    return alibi_slopes.detach().to(torch.float32).contiguous()


def score_bias(Tq: int, Tk: int, causal: bool, alibi_slopes: Optional[torch.Tensor] = None,
               window: Optional[int] = None, device=None,
               dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """What attention adds to scale * q @ k^T: ALiBi's -slope * (i' - j) per head and -inf where
    the causal mask or the window hides a key. (Hq or 1, Tq, Tk) in dtype, or None when there
    is nothing to add. i' = i + (Tk - Tq) is query i's position aligned bottom-right."""
    if not causal and alibi_slopes is None:
        return None
    i = torch.arange(Tq, device=device).unsqueeze(1) + (Tk - Tq)
    j = torch.arange(Tk, device=device).unsqueeze(0)
    dist = (i - j).to(dtype)  # (Tq, Tk): i' - j
    bias = torch.zeros(1, Tq, Tk, device=device, dtype=dtype)
    if alibi_slopes is not None:
        bias = -alibi_slopes.to(device=device, dtype=dtype).view(-1, 1, 1) * dist
    if causal:
        hidden = dist < 0
        if window is not None:
            hidden = hidden | (dist >= window)
        bias = bias.masked_fill(hidden, float("-inf"))
    return bias


def causal_mask(Tq: int, Tk: int, device=None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query i may attend key j, i.e. j <= i + (Tk - Tq)."""
    i = torch.arange(Tq, device=device).unsqueeze(1)
    j = torch.arange(Tk, device=device).unsqueeze(0)
    return j <= i + (Tk - Tq)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D): each kv head serves n_rep query heads (GQA)."""
    if n_rep == 1:
        return x
    B, Hkv, T, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, T, D).reshape(B, Hkv * n_rep, T, D)


def attention_probs(q, k, causal: bool, scale: float, alibi_slopes=None,
                    window: Optional[int] = None) -> torch.Tensor:
    """softmax(scale * Q K^T + bias + mask): (B, Hq, Tq, Tk) probabilities, each query row
    summing to 1 over the keys it sees (GQA: each query head against its key head)."""
    k = _repeat_kv(k, q.shape[1] // k.shape[1])
    att = (q @ k.transpose(-2, -1)) * scale  # (B, Hq, Tq, Tk)
    if alibi_slopes is None and window is None:
        if causal:
            att = att.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
        return torch.softmax(att, dim=-1)
    bias = score_bias(q.shape[2], k.shape[2], causal, alibi_slopes, window, q.device, q.dtype)
    return torch.softmax(att + bias, dim=-1)


def naive_attention(q, k, v, causal: bool, scale: float, alibi_slopes=None,
                    window: Optional[int] = None) -> torch.Tensor:
    """The reference: softmax(scale * Q K^T + bias + mask) V, materialising the (Tq, Tk) scores
    (attention_probs). (B, Hq, Tq, D)."""
    probs = attention_probs(q, k, causal, scale, alibi_slopes, window)
    return probs @ _repeat_kv(v, q.shape[1] // k.shape[1])  # (B, Hq, Tq, D)


def _sdpa_attention(q, k, v, causal: bool, scale: float, alibi_slopes=None,
                    window: Optional[int] = None) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
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


# ---------------------------------------------------------------------------------------------
# First-use self-check. The first time "ext" would run on a device type listed here for a
# (device, dtype, head dim, causal) combination, a small forward and backward are compared with
# the float64 reference by docs/design.md's rule. A combination that fails is warned about once,
# with the measured errors, and runs on "sdpa" from then on. MINIGPT_SELF_CHECK=0 turns it off.
_SELF_CHECK_DEVICES = {"cuda"}
_SELF_CHECK_ENV = "MINIGPT_SELF_CHECK"
_self_checks: dict = {}  # key -> None (passed) or the failure, one line


def rule_floor(dtype: torch.dtype) -> float:
    """The absolute slack of docs/design.md's correctness rule: 1e-6 for float32 (1e-12 for
    float64), relative to max(1, the size of the reference values); none for 16-bit dtypes."""
    return {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 0.0)


def within_rule(fast: torch.Tensor, naive: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                size: Optional[float] = None):
    """docs/design.md's rule for one quantity: (ok, fast's error, naive's error), errors being the
    max abs difference from the float64 reference ref. ok: error <= 2 x naive's + the floor.
    size: the magnitude the floor is relative to (default max|ref|)."""
    ref = ref.double().cpu()
    e_fast = (fast.double().cpu() - ref).abs().max().item()
    e_naive = (naive.double().cpu() - ref).abs().max().item()
    size = ref.abs().max().item() if size is None else size
    return e_fast <= 2 * e_naive + rule_floor(dtype) * max(1.0, size), e_fast, e_naive


def _self_check(device: torch.device, dtype: torch.dtype, head_dim: int,
                causal: bool, features: tuple = ()) -> Optional[str]:
    """Compare the compiled op with the float64 reference on fresh random inputs (GQA, two key
    tiles, Tq != Tk; ALiBi slopes and a window of 23 keys where features names them). None if
    every output and gradient meets the rule, else a description."""
    g = torch.Generator().manual_seed(20231)
    B, Hq, Hkv, Tq, Tk = 1, 4, 2, 67, 80
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
        ok, e_fast, e_naive = within_rule(fast[i], naive[i], ref[i], dtype,
                                          None if i == 0 else grad_size)
        if not ok:
            failures.append(f"{name} error {e_fast:.3g} > 2 x naive's {e_naive:.3g}")
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
def _cuda_default_reason(device: str, dtype: str) -> Optional[str]:
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
    requested = backend if backend is not None else os.environ.get(_ENV_BACKEND) or None
    if requested is not None and requested not in BACKENDS:
        source = "backend" if backend is not None else f"${_ENV_BACKEND}"
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
    why = _cuda_default_reason(str(device), str(dtype)) if device.type == "cuda" else None
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


def _cpu_autocast(device: torch.device) -> bool:
    """Whether device is the CPU and torch.autocast("cpu") is on."""
    return device.type == "cpu" and torch.is_autocast_enabled("cpu")


def cpu_autocast_dtype(dtype: torch.dtype, backend: Optional[str] = None) -> torch.dtype:
    """The dtype attention() computes bfloat16/float16 CPU inputs in under torch.autocast("cpu"),
    for the backend asked for (None: the default): float32, unless
    $MINIGPT_CPU_AUTOCAST_ATTENTION=bfloat16 keeps bfloat16 on a CPU with bf16 dot-product
    instructions (runtime.bf16_supported: AVX512_BF16 or AMX) where that backend is "ext".
    float32 is the default because it was measured faster: on an AMD EPYC (Zen 4, AVX512_BF16,
    2 threads) "ext" takes 2.6 ms in float32 against 4.7 ms in bfloat16 for the default model's
    forward+backward (B 32, 4 heads, T 64, D 32), and 29.6 against 42.7 ms at B 16, 6 heads,
    T 256, D 64. float16 is always computed in float32. The model calls this too, to cast its
    projections once."""
    wanted = os.environ.get(_ENV_AUTOCAST, "").strip().lower()
    if wanted not in ("", "float32", "bfloat16"):
        raise ValueError(f"${_ENV_AUTOCAST} must be float32 or bfloat16, got {wanted!r}")
    cpu = torch.device("cpu")
    if wanted == "bfloat16" and dtype == torch.bfloat16 and bf16_supported(cpu):
        try:
            if resolve_backend(backend, cpu, dtype) == "ext":
                return dtype
        except RuntimeError:  # "ext" forced where it cannot run: attention() says so
            return dtype
    return torch.float32


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              scale: Optional[float] = None, alibi_slopes: Optional[torch.Tensor] = None,
              window: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1).

    Args:
        q: (B, Hq, Tq, D) queries. Any strides with a contiguous last dimension are used
            without a copy (e.g. a (B, T, H, D) tensor ``.transpose(1, 2)``).
        k, v: (B, Hkv, Tk, D) keys and values; Hq must be a multiple of Hkv (grouped-query
            attention, Ainslie et al. 2023; Hkv == 1 is multi-query attention).
        causal: mask future keys, aligned bottom-right: query i sees keys j <= i + (Tk - Tq).
            Default True.
        scale: softmax scale, default 1/sqrt(D).
        alibi_slopes: None (default) or a floating (Hq,) tensor on q's device: ALiBi (Press et
            al. 2022, sec. 3) adds -alibi_slopes[h] * (i' - j) to the scaled score of query i
            and key j in head h, i' = i + (Tk - Tq). Used as float32 constants: no gradient
            flows to them (minigpt.model.alibi_slopes gives the paper's geometric sequence).
        window: None (default) or an int W >= 1, with causal=True: query i sees only keys
            i' - W < j <= i', its W most recent keys, itself included (sliding-window attention,
            Beltagy et al. 2020). The compiled kernels skip key tiles outside the window, so the
            cost grows as Tq * W rather than Tq * Tk.
        backend: "ext", "sdpa", "naive" or None (default: $MINIGPT_ATTENTION_BACKEND, else
            "ext" where the compiled kernels support the device, GPU, dtype and head dim and,
            on CUDA, were measured at least as fast as SDPA for the GPU's compute capability
            and this dtype (minigpt.attention.gpu_table: nowhere yet), implement alibi_slopes/window and
            passed their first-use self-check for this dtype/head dim/causal/terms; else
            "sdpa", which builds the (Hq, Tq, Tk) bias as a float mask when alibi_slopes or
            window is given).

    Returns:
        out: (B, Hq, Tq, D), q's dtype and device (float32 under CPU autocast, below).
        Differentiable in q, k and v.

    dtypes: every backend takes float32 and float64 on CPU (and the dtypes torch supports
    for "sdpa"/"naive"); "ext" implements float32/float64/bfloat16/float16 on CPU and
    bfloat16/float16/float32 on CUDA. Inside ``torch.autocast("cpu")``, bfloat16/float16 CPU
    inputs are computed in the dtype ``cpu_autocast_dtype`` gives: float32 (and the output is
    float32, as autocast does for its float32 ops: softmax, layer_norm), where "ext" was
    measured faster than in bfloat16; $MINIGPT_CPU_AUTOCAST_ATTENTION=bfloat16 keeps bfloat16.

    Raises:
        TypeError: a non-tensor argument, an integer dtype, or mixed dtypes.
        ValueError: wrong rank, mismatched batch/head/dim sizes, k and v of different shapes,
            Hq not a multiple of Hkv, causal with Tq > Tk, tensors on different devices, a
            non-positive scale, alibi_slopes not of shape (Hq,) or not on q's device, window
            not a positive int or given with causal=False, or an unknown backend name.
        RuntimeError: backend="ext" when the compiled kernels are not available here (not
            built, a GPU older than compute capability 8.0 or of an arch the build lacks, an
            unsupported dtype or head dim, a failed self-check); the message says why.
    """
    _check_inputs(q, k, v, causal, scale, alibi_slopes, window)
    if q.dtype in (torch.bfloat16, torch.float16) and _cpu_autocast(q.device):
        dtype = cpu_autocast_dtype(q.dtype, backend)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scale = float(scale)
    name = resolve_backend(backend, q.device, q.dtype, q.shape[-1], causal,
                           features_of(alibi_slopes, window))
    return REGISTRY[name].fn(q, k, v, causal, scale, slopes_for(alibi_slopes), window)


def attention_backends() -> dict:
    """Report each backend of REGISTRY: ``{name: {"available": bool, "reason": str | None}}``,
    for CPU float32; where a CUDA GPU is visible, also "cuda_available" and
    "cuda_reason" for bfloat16 on it (e.g. a GPU older than compute capability 8.0, or an arch
    the build lacks). "reason" says why a backend is unavailable (e.g. the build error of the
    compiled module). "ext", when available, also carries "build_info" and "cuda". Also
    includes "default": the backend attention() picks for CPU float32; and where a CUDA GPU is
    visible, "cuda_default": ``{dtype name: {"backend": str, "reason": str | None}}`` for
    bfloat16, float16 and float32 on it (head dim 64, causal, no self-check run): "reason" says
    why it is not "ext", e.g. the ratio to SDPA measured on that compute capability
    (minigpt.attention.gpu_table).
    """
    report = {}
    cpu = torch.device("cpu")
    for name, b in REGISTRY.items():
        why = b.unavailable(cpu, torch.float32)
        report[name] = {"available": why is None, "reason": why}
        if torch.cuda.is_available():
            cuda_why = b.unavailable(torch.device("cuda"), torch.bfloat16)
            report[name]["cuda_available"] = cuda_why is None
            report[name]["cuda_reason"] = cuda_why
    if report["ext"]["available"]:
        info = _ext.build_info()
        report["ext"]["build_info"] = info
        report["ext"]["cuda"] = bool(info.get("cuda", False))
    env = os.environ.get(_ENV_BACKEND)
    report["default"] = env if env else next(n for n in BACKENDS if report[n]["available"])
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        report["cuda_default"] = {}
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            why = _cuda_default_reason(str(cuda), str(dtype))
            if why is None:
                why = REGISTRY["ext"].unavailable(cuda, dtype, 64)
            name = env if env else ("ext" if why is None else "sdpa")
            report["cuda_default"][str(dtype).replace("torch.", "")] = {
                "backend": name, "reason": None if env or why is None else why}
    return report
