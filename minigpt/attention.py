"""Scaled dot-product attention with a choice of backends.

    attention(q, k, v, *, causal=True, scale=None, backend=None) -> out

    out = softmax(scale * q @ k^T + mask) @ v            (Vaswani et al. 2017, eq. 1)

Backends:

- ``"ext"``   our compiled kernels (C++ on CPU, CUDA on GPU; ``minigpt._C``), FlashAttention-2
  style (Dao 2023, Alg. 1 and 2): tiled, online softmax, memory linear in T. Bound as the
  custom ops ``torch.ops.minigpt.attention_forward`` / ``attention_backward`` with fake (meta)
  and autograd formulas registered here, so ``torch.compile`` and ``torch.library.opcheck`` work.
- ``"sdpa"``  PyTorch's ``torch.nn.functional.scaled_dot_product_attention``.
- ``"naive"`` the readable reference: the explicit softmax(QK^T / sqrt(D)) V below. It builds
  the full (Tq, Tk) score matrix; tests compare every fast path against it in float64.

The causal mask is aligned bottom-right: query i (0-based, of Tq) sees keys j <= i + (Tk - Tq).
With Tq == Tk that is the usual lower triangle; with Tq == 1 it is a decode step that sees the
whole KV cache. Example, Tq = 2, Tk = 5 (1 = attended)::

    1 1 1 1 0
    1 1 1 1 1
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from . import _ext

__all__ = ["attention", "attention_backends", "BACKENDS"]

BACKENDS = ("ext", "sdpa", "naive")
_ENV_BACKEND = "MINIGPT_ATTENTION_BACKEND"

# dtypes the compiled kernels implement, per device type (DESIGN.md).
_EXT_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.bfloat16, torch.float16, torch.float32),
}
_EXT_CUDA_HEAD_DIMS = (32, 64, 96, 128)  # template instances of the CUDA kernels


def _describe(name: str, t: torch.Tensor) -> str:
    return f"{name} of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_inputs(q, k, v, causal, scale) -> None:
    """Validate the contract of DESIGN.md once, before any kernel runs."""
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


def naive_attention(q, k, v, causal: bool, scale: float, return_probs: bool = False):
    """The reference: softmax(scale * Q K^T + mask) V, materialising the (Tq, Tk) scores.
    With return_probs, returns (out, probs), probs (B, Hq, Tq, Tk) (for looking at attention)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    att = (q @ k.transpose(-2, -1)) * scale  # (B, Hq, Tq, Tk)
    if causal:
        att = att.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    att = torch.softmax(att, dim=-1)
    out = att @ v  # (B, Hq, Tq, D)
    return (out, att) if return_probs else out


def _sdpa_attention(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    Tq, Tk = q.shape[2], k.shape[2]
    if causal and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    # SDPA's is_causal is aligned top-left when Tq != Tk; ours is bottom-right. A decode step
    # (Tq == 1) sees every key, so it needs no mask at all.
    mask = causal_mask(Tq, Tk, q.device) if causal and Tq > 1 else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _ext_attention(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    # The kernels take any strides whose last dimension is contiguous; copy only otherwise.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, _ = torch.ops.minigpt.attention_forward(q, k, v, causal, scale)
    return out


_registered = False


def _register_ext_ops() -> None:
    """Fake (meta) and autograd formulas for the compiled ops (pytorch/extension-cpp's pattern),
    so that torch.compile traces them and torch.library.opcheck passes."""
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("minigpt::attention_forward")
    def _forward_fake(q, k, v, causal, scale):
        B, Hq, Tq, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((B, Hq, Tq), dtype=torch.float32)

    @torch.library.register_fake("minigpt::attention_backward")
    def _backward_fake(dout, q, k, v, out, lse, causal, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.set_materialize_grads(False)  # an unused lse gets no zero-filled gradient

    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        elif dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = torch.ops.minigpt.attention_backward(dout, q, k, v, out, lse,
                                                          ctx.causal, ctx.scale)
        if dlse is not None:
            # lse_i = log sum_j exp(s_ij), so d lse_i / d s_ij = P_ij: dq_i gains
            # scale * dlse_i * sum_j P_ij k_j (attention with v = k), and dk_j gains
            # scale * sum_i P_ij dlse_i q_i (the dv of a backward whose dout is dlse * q).
            pk, _ = torch.ops.minigpt.attention_forward(q, k, k, ctx.causal, ctx.scale)
            _, _, pq = torch.ops.minigpt.attention_backward(
                (dlse.unsqueeze(-1) * q).to(q.dtype), q, k, k, pk, lse, ctx.causal, ctx.scale)
            dq = dq + ctx.scale * dlse.unsqueeze(-1).to(q.dtype) * pk
            dk = dk + ctx.scale * pq
        return dq, dk, dv, None, None

    torch.library.register_autograd("minigpt::attention_forward", backward,
                                    setup_context=setup_context)


_ext.on_load(_register_ext_ops)
_ext.module(jit=False)  # a built minigpt._C defines torch.ops.minigpt.* as soon as minigpt is imported


def _ext_unavailable_reason(device: torch.device, dtype: torch.dtype,
                            head_dim: Optional[int] = None) -> Optional[str]:
    """None if the compiled kernels can run on this device, dtype (and head dim), else why not."""
    why = _ext.unavailable_reason()
    if why is not None:
        return why
    if device.type not in _EXT_DTYPES:
        return f"the compiled kernels do not support device type '{device.type}'"
    if device.type == "cuda" and not _ext.build_info().get("cuda", False):
        return "minigpt._C was built without CUDA kernels"
    if dtype not in _EXT_DTYPES[device.type]:
        names = ", ".join(str(d).replace("torch.", "") for d in _EXT_DTYPES[device.type])
        return f"the compiled kernels on {device.type} support {names}, not {dtype}"
    if device.type == "cuda" and head_dim is not None and head_dim not in _EXT_CUDA_HEAD_DIMS:
        return (f"the CUDA kernels support head dims {_EXT_CUDA_HEAD_DIMS}, not {head_dim}")
    return None


_warned_fallback = False


def _resolve_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype,
                     head_dim: Optional[int] = None) -> str:
    global _warned_fallback
    requested = backend if backend is not None else os.environ.get(_ENV_BACKEND) or None
    if requested is not None and requested not in BACKENDS:
        source = "backend" if backend is not None else f"${_ENV_BACKEND}"
        raise ValueError(f"attention: {source} must be one of {BACKENDS} or None, "
                         f"got {requested!r}")
    if requested == "ext":
        why = _ext_unavailable_reason(device, dtype, head_dim)
        if why is not None:
            hint = f" {_ext.BUILD_HINT}" if _ext.unavailable_reason() is not None else ""
            raise RuntimeError(f"attention: backend 'ext' is not available: {why}.{hint}")
        return "ext"
    if requested is not None:
        return requested
    why = _ext_unavailable_reason(device, dtype, head_dim)
    if why is None:
        return "ext"
    if _ext.unavailable_reason() is not None and not _warned_fallback:
        # Only a missing/broken build is worth a warning; an unsupported dtype is by design.
        _warned_fallback = True
        warnings.warn(f"minigpt: compiled attention unavailable ({why}); using 'sdpa'. "
                      f"{_ext.BUILD_HINT}", RuntimeWarning, stacklevel=3)
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1).

    Args:
        q: (B, Hq, Tq, D) queries. Any strides with a contiguous last dimension are used
            without a copy (e.g. a (B, T, H, D) tensor ``.transpose(1, 2)``).
        k, v: (B, Hkv, Tk, D) keys and values; Hq must be a multiple of Hkv (grouped-query
            attention, Ainslie et al. 2023; Hkv == 1 is multi-query attention).
        causal: mask future keys, aligned bottom-right: query i sees keys j <= i + (Tk - Tq).
            Default True.
        scale: softmax scale, default 1/sqrt(D).
        backend: "ext", "sdpa", "naive" or None (default: $MINIGPT_ATTENTION_BACKEND, else
            "ext" where the compiled kernels support the device and dtype, else "sdpa").

    Returns:
        out: (B, Hq, Tq, D), q's dtype and device. Differentiable in q, k and v.

    dtypes: every backend takes float32 and float64 on CPU (and the dtypes torch supports
    for "sdpa"/"naive"); "ext" implements float32/float64 on CPU and bfloat16/float16/float32
    on CUDA.

    Raises:
        TypeError: a non-tensor argument, an integer dtype, or mixed dtypes.
        ValueError: wrong rank, mismatched batch/head/dim sizes, k and v of different shapes,
            Hq not a multiple of Hkv, causal with Tq > Tk, tensors on different devices, a
            non-positive scale, or an unknown backend name.
        RuntimeError: backend="ext" when the compiled kernels are not available; the message
            says why and how to build them.
    """
    _check_inputs(q, k, v, causal, scale)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scale = float(scale)
    name = _resolve_backend(backend, q.device, q.dtype, q.shape[-1])
    if name == "ext":
        return _ext_attention(q, k, v, causal, scale)
    if name == "sdpa":
        return _sdpa_attention(q, k, v, causal, scale)
    return naive_attention(q, k, v, causal, scale)


def attention_backends() -> dict:
    """Report each backend: ``{name: {"available": bool, "reason": str | None}}``.

    "ext" is reported for CPU float32 (and CUDA, if compiled); "reason" says why a backend is
    unavailable (e.g. the build error of the compiled module). "sdpa" and "naive" are always
    available. Also includes "default": the backend attention() picks for CPU float32.
    """
    report = {}
    why = _ext_unavailable_reason(torch.device("cpu"), torch.float32)
    report["ext"] = {"available": why is None, "reason": why}
    if why is None:
        info = _ext.build_info()
        report["ext"]["build_info"] = info
        report["ext"]["cuda"] = bool(info.get("cuda", False))
    report["sdpa"] = {"available": True, "reason": None}
    report["naive"] = {"available": True, "reason": None}
    env = os.environ.get(_ENV_BACKEND)
    report["default"] = env if env else ("ext" if why is None else "sdpa")
    return report
