"""The input checks of the attention contract (docs/design.md, "The attention contract"), made
once, at the boundary, before any backend or kernel runs. Every message names the argument and
its shape, dtype and device. The compiled ops check again in C++ (TORCH_CHECK), so direct op
calls are safe too.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def describe(name: str, t: torch.Tensor) -> str:
    """How every error names a tensor: "q of shape (1, 2, 3, 4), dtype torch.float32, device cpu"."""
    return f"{name} of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_inputs(q, k, v, causal, scale, alibi_slopes=None, window=None) -> None:
    """Check the arguments of minigpt.attention.attention against the contract.

    Raises:
        TypeError: q, k, v or alibi_slopes not a tensor; an integer dtype; mixed dtypes.
        ValueError: not 4-d; k, v of different shapes or not matching q's batch size and head
            dim; Hq not a multiple of Hkv; zero heads or head dim; causal with Tq > Tk;
            tensors on different devices; scale not positive and finite; alibi_slopes not a
            finite floating (Hq,) tensor on q's device; window not an int >= 1, or given with
            causal=False.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"attention: {name} must be 4-d (B, H, T, D), got {describe(name, t)}")
        if not t.is_floating_point():
            raise TypeError(
                f"attention: {name} must have a floating dtype, got {describe(name, t)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"attention: q and {name} must have the same dtype, got "
                            f"{describe('q', q)} and {describe(name, t)}")
        if t.device != q.device:
            raise ValueError(f"attention: q and {name} must be on the same device, got "
                             f"{describe('q', q)} and {describe(name, t)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got "
                         f"{describe('k', k)} and {describe('v', v)}")
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"attention: k must have q's batch size and head dim, got "
                         f"{describe('q', q)} and {describe('k', k)}")
    Hkv, Tk = k.shape[1], k.shape[2]
    if Hq == 0:
        raise ValueError(f"attention: q must have at least one head, got {describe('q', q)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"attention: the number of query heads ({Hq}) must be a multiple of "
                         f"the number of key/value heads ({Hkv}); got {describe('q', q)} and "
                         f"{describe('k', k)}")
    if D == 0:
        raise ValueError(f"attention: head dim must be positive, got {describe('q', q)}")
    if causal and Tq > Tk:
        raise ValueError(f"attention: causal attention needs Tq <= Tk (the mask is aligned "
                         f"bottom-right), got Tq={Tq} from {describe('q', q)} and Tk={Tk} from "
                         f"{describe('k', k)}")
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
                             f"{describe('alibi_slopes', alibi_slopes)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"attention: alibi_slopes must be on q's device {q.device}, got "
                             f"{describe('alibi_slopes', alibi_slopes)}")
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
