"""QK-norm and RoPE of the queries and keys as one compiled CPU op (csrc/qk_rope_cpu.cpp).

qkv_norm_rope(qkv, n_q, n_k, q_gain, k_gain, cos, sin, eps, norm) splits c_attn's output qkv
(B, T, (n_q + 2 n_k) * head_dim) into its n_q query, n_k key and n_k value heads and computes,
for each query and key head vector:

    y = x / sqrt(mean(x^2) + eps) * gain          (QK-norm: RMSNorm per head; if norm)
    (y[2i], y[2i+1]) rotated by the angle of (t, i)   (RoPE, Su et al. 2021, eq. 34)

It returns q (B, T, n_q, head_dim), k and v (B, T, n_k, head_dim) in out_dtype, float32 or
bfloat16, the dtype attention computes in: the values of CausalSelfAttention.qkv's unfused
PyTorch code (a cast to float32, a split, RMSNorm modules, then RotaryEmbedding), computed in
float32 and rounded once to out_dtype, in one pass forward and one backward, where that code
makes several passes and autograd nodes. qkv may be float32, or bfloat16/float16 under CPU
autocast: the op reads it in its dtype and its backward writes qkv's gradient whole, in that
dtype, so neither the cast nor the concatenation of the heads' gradients costs a pass of its
own. The model uses it on the CPU when attention computes in float32, or in bfloat16 under CPU
autocast (cpu_autocast_dtype), and the attention backend is "ext" or chosen automatically;
otherwise, and for learners reading the model, the PyTorch code runs. Tests:
tests/test_qk_rope.py (float64 reference, gradients).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from minigpt.attention import _ext


_loaded: Optional[bool] = None  # whether the compiled module holds the op (looked up once)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the dtypes of qkv the op reads
OUT_DTYPES = (torch.float32, torch.bfloat16)  # the dtypes it writes q, k and v in


def _op_loaded() -> bool:
    global _loaded
    if _loaded is None:
        _loaded = (_ext.module() is not None
                   and hasattr(torch.ops.minigpt, "qkv_norm_rope_forward"))
    return _loaded


def available(x: torch.Tensor, out_dtype: torch.dtype = torch.float32,
              gain: Optional[torch.Tensor] = None) -> bool:
    """Whether the fused op reads x and writes out_dtype: x float32, bfloat16 or float16 on the
    CPU, out_dtype float32 or bfloat16, the gain (if any) float32, the compiled module loaded
    with the op, and not inside torch.compile (which traces the PyTorch code instead)."""
    return (x.dtype in DTYPES and x.device.type == "cpu" and out_dtype in OUT_DTYPES
            and (gain is None or gain.dtype == torch.float32)
            and not torch.compiler.is_compiling() and _op_loaded())


def _rows(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad in dtype with its last dimension contiguous, as the backward op reads it (the
    gradient of a sum is an expanded tensor whose strides are all 0)."""
    grad = grad.to(dtype)
    return grad if grad.stride(-1) == 1 else grad.contiguous()


class _QKVNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, q_gain, k_gain, cos, sin, n_q, n_k, head_dim, eps, norm, out_dtype):
        q, k, v, rstd = torch.ops.minigpt.qkv_norm_rope_forward(
            qkv, n_q, n_k, head_dim, q_gain, k_gain, cos, sin, eps, norm, out_dtype)
        ctx.save_for_backward(qkv, rstd, q_gain, k_gain, cos, sin)
        ctx.shape = (n_q, n_k, head_dim, norm, out_dtype)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        qkv, rstd, q_gain, k_gain, cos, sin = ctx.saved_tensors
        n_q, n_k, head_dim, norm, out_dtype = ctx.shape
        dqkv, dq_gain, dk_gain = torch.ops.minigpt.qkv_norm_rope_backward(
            _rows(dq, out_dtype), _rows(dk, out_dtype), _rows(dv, out_dtype), qkv, rstd, n_q,
            n_k, head_dim, q_gain, k_gain, cos, sin, norm)
        return (dqkv, dq_gain if q_gain is not None else None,
                dk_gain if k_gain is not None else None) + (None,) * 8


def qkv_norm_rope(qkv: torch.Tensor, n_q: int, n_k: int, q_gain: Optional[torch.Tensor],
                  k_gain: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                  eps: float, norm: bool, out_dtype: torch.dtype = torch.float32,
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See the module's docstring.

    Args:
        qkv: (B, T, (n_q + 2 n_k) * head_dim) float32, bfloat16 or float16 CPU, last dimension
            contiguous: c_attn's output, query heads, then key heads, then value heads.
        q_gain, k_gain: (head_dim,) float32 RMSNorm gains, or None (no gain).
        cos, sin: (T, head_dim / 2) float32, of each position's angles.
        eps: RMSNorm's epsilon. norm: False rotates only.
        out_dtype: the dtype of q, k and v, float32 (default) or bfloat16.

    Returns:
        q (B, T, n_q, head_dim), k and v (B, T, n_k, head_dim), out_dtype and contiguous;
        differentiable in qkv and the gains (qkv's gradient has qkv's dtype).

    Raises:
        ValueError: out_dtype is not float32 or bfloat16.
        RuntimeError: the op's one-line check of shapes and dtypes.
    """
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    head_dim = 2 * cos.shape[-1]
    return _QKVNormRope.apply(qkv, q_gain, k_gain, cos.contiguous(), sin.contiguous(), n_q, n_k,
                              head_dim, float(eps), bool(norm), out_dtype)
