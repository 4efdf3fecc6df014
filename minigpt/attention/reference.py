"""The reference attention, written out: the slow path every fast one is tested against.

    out = softmax(scale * Q K^T + bias) V          (Vaswani et al. 2017, eq. 1; scale = 1/sqrt(D))

bias holds what the options add to the scores of query i and key j, where i' = i + (Tk - Tq) is
the query's position aligned bottom-right with the keys:

- causal: -inf where j > i' (the decoder's mask, Vaswani et al. 2017, sec. 3.2.3).
- window W: also -inf where j <= i' - W, so a query sees its W most recent keys, itself included
  (sliding-window attention: Child et al. 2019; Beltagy et al. 2020, "Longformer", sec. 3.1).
- ALiBi: -alibi_slopes[h] * (i' - j) in head h (Press et al. 2022, "Train Short, Test Long",
  sec. 3), a penalty growing linearly with the distance to the key.

Grouped-query attention (Ainslie et al. 2023): query head h uses key/value head h // (Hq / Hkv).

Every function builds the full (Tq, Tk) score matrix: memory quadratic in the sequence length.
"""

from __future__ import annotations

from typing import Optional

import torch


def causal_mask(Tq: int, Tk: int, device=None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query i may attend key j: j <= i + (Tk - Tq)."""
    i = torch.arange(Tq, device=device).unsqueeze(1)  # (Tq, 1)
    j = torch.arange(Tk, device=device).unsqueeze(0)  # (1, Tk)
    return j <= i + (Tk - Tq)


def score_bias(Tq: int, Tk: int, causal: bool, alibi_slopes: Optional[torch.Tensor] = None,
               window: Optional[int] = None, device=None,
               dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """What attention adds to scale * Q K^T: ALiBi's -slope_h * (i' - j) and -inf where the causal
    mask or the window hides a key.

    Returns:
        (Hq, Tq, Tk) with alibi_slopes (Hq,), else (1, Tq, Tk), in dtype; None when neither
        causal nor alibi_slopes is given (window counts only with causal).
    """
    if not causal and alibi_slopes is None:
        return None
    i = torch.arange(Tq, device=device).unsqueeze(1) + (Tk - Tq)  # (Tq, 1): i'
    j = torch.arange(Tk, device=device).unsqueeze(0)  # (1, Tk)
    dist = i - j  # (Tq, Tk) int64: i' - j, exact at any length
    if alibi_slopes is None:
        bias = torch.zeros(1, Tq, Tk, device=device, dtype=dtype)
    else:
        bias = -alibi_slopes.to(device=device, dtype=dtype).view(-1, 1, 1) * dist.to(dtype)
    if causal:
        hidden = dist < 0
        if window is not None:
            hidden = hidden | (dist >= window)
        bias = bias.masked_fill(hidden, float("-inf"))
    return bias


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    B, Hkv, T, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, T, D).reshape(B, Hkv * n_rep, T, D)


def attention_probs(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float,
                    alibi_slopes: Optional[torch.Tensor] = None,
                    window: Optional[int] = None) -> torch.Tensor:
    """softmax(scale * Q K^T + bias): the attention weights.

    Args:
        q: (B, Hq, Tq, D). k: (B, Hkv, Tk, D), Hq a multiple of Hkv.
        causal, scale, alibi_slopes ((Hq,) or None), window (int >= 1 or None): as in
            minigpt.attention.attention; the inputs are not checked here.

    Returns:
        (B, Hq, Tq, Tk) in q's dtype; each row sums to 1 over the keys the query sees.
    """
    k = repeat_kv(k, q.shape[1] // k.shape[1])  # (B, Hq, Tk, D)
    att = (q @ k.transpose(-2, -1)) * scale  # (B, Hq, Tq, Tk)
    Tq, Tk = q.shape[2], k.shape[2]
    if alibi_slopes is None and window is None:
        if causal:
            att = att.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
        return torch.softmax(att, dim=-1)
    bias = score_bias(Tq, Tk, causal, alibi_slopes, window, q.device, q.dtype)
    return torch.softmax(att + bias, dim=-1)  # (B, Hq, Tq, Tk)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    scale: float, alibi_slopes: Optional[torch.Tensor] = None,
                    window: Optional[int] = None) -> torch.Tensor:
    """The "naive" backend: attention_probs(q, k, ...) @ V.

    Args:
        q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D); the rest as in attention_probs.

    Returns:
        (B, Hq, Tq, D) in q's dtype, differentiable in q, k and v.
    """
    probs = attention_probs(q, k, causal, scale, alibi_slopes, window)  # (B, Hq, Tq, Tk)
    return probs @ repeat_kv(v, q.shape[1] // k.shape[1])  # (B, Hq, Tq, D)
