"""QK-norm and RoPE of the queries and keys as one compiled CPU op (csrc/qk_rope_cpu.cpp).

qk_norm_rope(qk, n_q, n_k, q_gain, k_gain, cos, sin, eps, norm) computes, for each of the n_q
query heads and n_k key heads of qk (B, T, (n_q + n_k) * head_dim):

    y = x / sqrt(mean(x^2) + eps) * gain          (QK-norm: RMSNorm per head; if norm)
    (y[2i], y[2i+1]) rotated by the angle of (t, i)   (RoPE, Su et al. 2021, eq. 34)

and returns (B, T, n_q + n_k, head_dim) float32: the values of CausalSelfAttention.qkv's
unfused PyTorch code (RMSNorm modules, then RotaryEmbedding), in one pass forward and one
backward, where that code makes several passes and autograd nodes. The model uses it for
float32 CPU tensors (also under CPU autocast, where qkv is cast to float32 for attention) when
the attention backend is "ext" or chosen automatically; otherwise, and for learners reading the
model, the PyTorch code runs. Tests: tests/test_qk_rope.py (float64 reference, gradients).
"""

from __future__ import annotations

from typing import Optional

import torch

from minigpt.attention import _ext


_loaded: Optional[bool] = None  # whether the compiled module holds the op (looked up once)


def _op_loaded() -> bool:
    global _loaded
    if _loaded is None:
        _loaded = (_ext.module() is not None
                   and hasattr(torch.ops.minigpt, "qk_norm_rope_forward"))
    return _loaded


def available(x: torch.Tensor) -> bool:
    """Whether the fused op serves x: float32 on the CPU, the compiled module loaded with the
    op, and not inside torch.compile (which traces the PyTorch code instead)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.compiler.is_compiling() and _op_loaded())


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qk, q_gain, k_gain, cos, sin, n_q, n_k, head_dim, eps, norm):
        out, rstd = torch.ops.minigpt.qk_norm_rope_forward(qk, n_q, n_k, head_dim, q_gain,
                                                           k_gain, cos, sin, eps, norm)
        ctx.save_for_backward(qk, rstd, q_gain, k_gain, cos, sin)
        ctx.shape = (n_q, n_k, head_dim, norm)
        return out

    @staticmethod
    def backward(ctx, dout):
        qk, rstd, q_gain, k_gain, cos, sin = ctx.saved_tensors
        n_q, n_k, head_dim, norm = ctx.shape
        dx, dq_gain, dk_gain = torch.ops.minigpt.qk_norm_rope_backward(
            dout.float(), qk, rstd, n_q, n_k, head_dim, q_gain, k_gain, cos, sin, norm)
        return (dx, dq_gain if q_gain is not None else None,
                dk_gain if k_gain is not None else None) + (None,) * 7


def qk_norm_rope(qk: torch.Tensor, n_q: int, n_k: int, q_gain: Optional[torch.Tensor],
                 k_gain: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                 eps: float, norm: bool) -> torch.Tensor:
    """See the module's docstring.

    Args:
        qk: (B, T, (n_q + n_k) * head_dim) float32 CPU, last dimension contiguous (a view of
            c_attn's output is fine).
        q_gain, k_gain: (head_dim,) float32 RMSNorm gains, or None (no gain).
        cos, sin: (T, head_dim / 2) float32, of each position's angles.
        eps: RMSNorm's epsilon. norm: False rotates only.

    Returns:
        (B, T, n_q + n_k, head_dim) float32; differentiable in qk and the gains.

    Raises:
        RuntimeError: the op's one-line check of shapes and dtypes.
    """
    head_dim = 2 * cos.shape[-1]
    return _QKNormRope.apply(qk, q_gain, k_gain, cos.contiguous(), sin.contiguous(), n_q, n_k,
                             head_dim, float(eps), bool(norm))
