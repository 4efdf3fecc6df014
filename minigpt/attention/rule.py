"""The correctness rule of docs/design.md, in one place: the self-check, the profiler and the
tests all judge a fast attention path by it.

A fast path's error against a float64 reference must be at most twice the error of the naive
computation (minigpt.attention.reference) in the same dtype against that reference, plus a
floor: 1e-6 for float32, 1e-12 for float64, 0 for 16-bit dtypes, times max(1, size), size being
the magnitude of the reference values (for gradients, the largest of the reference gradients).
Errors are max absolute differences. FlashAttention's tests judge its kernels the same way
(Dao et al. 2022; Dao-AILab/flash-attention, tests/test_flash_attn.py). The floor covers a
naive computation that happens to be exact (dq and dk are exactly 0 with a single key) while a
fused kernel rounds intermediates of size 1.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


def rule_floor(dtype: torch.dtype) -> float:
    """The absolute slack of the rule per unit of size: 1e-6 for float32, 1e-12 for float64,
    0.0 for any other dtype."""
    return {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 0.0)


def rule_bound(naive_error: float, dtype: torch.dtype, size: float) -> float:
    """The largest error the rule allows a fast path: 2 * naive_error + rule_floor(dtype) *
    max(1, size)."""
    return 2 * naive_error + rule_floor(dtype) * max(1.0, size)


class Verdict(NamedTuple):
    """The rule applied to one quantity: ok is error <= bound."""

    ok: bool
    error: float  # the fast path's max abs error against the reference
    naive_error: float  # the naive computation's, same dtype
    bound: float  # rule_bound(naive_error, dtype, size)


def within_rule(fast: torch.Tensor, naive: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                size: Optional[float] = None) -> Verdict:
    """Judge one quantity (an output or a gradient) by the rule.

    Args:
        fast, naive: the fast path's and the naive computation's result, any device and dtype.
        ref: the float64 reference, same shape.
        dtype: the dtype the two were computed in (it sets the floor).
        size: the magnitude the floor is relative to; default max |ref|.
    """
    ref = ref.double().cpu()
    error = (fast.double().cpu() - ref).abs().max().item()
    naive_error = (naive.double().cpu() - ref).abs().max().item()
    bound = rule_bound(naive_error, dtype, ref.abs().max().item() if size is None else size)
    return Verdict(error <= bound, error, naive_error, bound)
