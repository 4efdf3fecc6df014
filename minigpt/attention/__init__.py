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
- ``"naive"`` the readable reference: the explicit softmax(QK^T / sqrt(D)) V of
  minigpt.attention.reference. It builds the full (Tq, Tk) score matrix; tests compare every
  fast path against it in float64.

The causal mask is aligned bottom-right: query i (0-based, of Tq) sees keys j <= i + (Tk - Tq).
With Tq == Tk that is the usual lower triangle; with Tq == 1 it is a decode step that sees the
whole KV cache. Example, Tq = 2, Tk = 5 (1 = attended)::

    1 1 1 1 0
    1 1 1 1 1

and the same with window=2::

    0 0 1 1 0
    0 0 0 1 1

The package, in reading order: reference.py (the math, written out), contract.py (the input
checks), rule.py (the correctness rule every fast path is judged by), backends.py (the registry,
the choice of backend, the first-use self-check), op.py (the compiled ops' fake and autograd
formulas), _ext.py and _build.py (loading and building minigpt._C), gpu_table.py (the measured
GPU speeds that make "ext" the CUDA default).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from minigpt.attention import _ext
from minigpt.attention.backends import (BACKENDS, ENV_BACKEND, REGISTRY, Backend,
                                        available_backends, cpu_autocast_dtype,
                                        cuda_default_reason, features_of, resolve_backend,
                                        unavailable_reason)
from minigpt.attention.contract import check_inputs, slopes_for
from minigpt.attention.reference import attention_probs, naive_attention
from minigpt.attention.rule import rule_floor, within_rule

__all__ = ["attention", "attention_backends", "BACKENDS", "Backend", "REGISTRY",
           "resolve_backend", "unavailable_reason", "available_backends", "cpu_autocast_dtype",
           "naive_attention", "attention_probs", "within_rule", "rule_floor"]


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
            and this dtype (minigpt.attention.gpu_table: nowhere yet), implement
            alibi_slopes/window and passed their first-use self-check for this dtype/head
            dim/causal/terms; else
            "sdpa", which builds the (Hq, Tq, Tk) bias as a float mask when alibi_slopes or
            window is given).

    Returns:
        out: (B, Hq, Tq, D), q's dtype and device (under CPU autocast, the dtype below).
        Differentiable in q, k and v.

    dtypes: every backend takes float32 and float64 on CPU (and the dtypes torch supports
    for "sdpa"/"naive"); "ext" implements float32/float64/bfloat16/float16 on CPU and
    bfloat16/float16/float32 on CUDA. Inside ``torch.autocast("cpu")``, bfloat16/float16 CPU
    inputs are computed in the dtype ``cpu_autocast_dtype`` gives: bfloat16 inputs stay
    bfloat16 on "ext" where the CPU has bf16 dot-product instructions (AVX512_BF16 or AMX);
    otherwise, and with $MINIGPT_CPU_AUTOCAST_ATTENTION=float32, they are computed in float32
    and the output is float32, as autocast does for its float32 ops (softmax, layer_norm).

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
    check_inputs(q, k, v, causal, scale, alibi_slopes, window)
    if (q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")):
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
    env = os.environ.get(ENV_BACKEND)
    report["default"] = env if env else next(n for n in BACKENDS if report[n]["available"])
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        report["cuda_default"] = {}
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            why = cuda_default_reason(str(cuda), str(dtype))
            if why is None:
                why = REGISTRY["ext"].unavailable(cuda, dtype, 64)
            name = env if env else ("ext" if why is None else "sdpa")
            report["cuda_default"][str(dtype).replace("torch.", "")] = {
                "backend": name, "reason": None if env or why is None else why}
    return report
