"""Position encodings (GPTConfig.pos_embedding) and longer contexts.

- RoPE (Su et al. 2021, "RoFormer", eq. 34): RotaryEmbedding rotates q and k in every layer;
  with Llama 3.1's frequency scaling (rope_scaling).
- ALiBi (Press et al. 2022, "Train Short, Test Long"): alibi_slopes, one slope per head;
  minigpt.attention adds -slope * (i - j) to the scores.
- Fixed sinusoids (Vaswani et al. 2017, "Attention Is All You Need", sec. 3.5):
  sinusoidal_encoding, added to the token embeddings.
- GPT-2's learned table is an nn.Embedding of the model (transformer.wpe); with_block_size
  gives a model a longer (or shorter) context, to measure length extrapolation.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional

import torch
import torch.nn as nn


class RotaryEmbedding(nn.Module):
    """RoPE: rotate each pair (x[2i], x[2i+1]) of a query or key at position p by the angle
    p * theta^(-2i/head_dim), so that q_m . k_n depends on positions only through m - n.

    Hugging Face's Llama pairs (x[i], x[i + head_dim/2]) instead; minigpt.hf.pretrained permutes
    the q and k rows of such weights to this pairing. Angles are computed from the positions on
    each call (T x head_dim/2 values), so there is no table to size or move. No parameters.

    scaling: None, or Llama 3.1's {"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"} (see inv_freq).
    """

    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict] = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling

    @staticmethod
    def angle_dtype(device: torch.device) -> torch.dtype:
        """Of the angles: float64, or float32 on MPS (which has no float64)."""
        return torch.float32 if device.type == "mps" else torch.float64

    @staticmethod
    def inv_freq(head_dim: int, theta: float, scaling: Optional[dict], dtype: torch.dtype,
                 device=None) -> torch.Tensor:
        """The frequencies theta^(-2i/head_dim), i < head_dim/2, in radians per position:
        (head_dim/2,) of dtype.

        With rope_type "llama3" (Meta's apply_scaling; transformers'
        _compute_llama3_parameters), L = original_max_position_embeddings: a frequency whose
        wavelength 2 pi / f exceeds L / low_freq_factor is divided by factor, one below
        L / high_freq_factor is kept, and one in between is interpolated:
        (1 - s) f / factor + s f, s = (L / wavelength - low_freq_factor) /
        (high_freq_factor - low_freq_factor).
        """
        exponent = torch.arange(0, head_dim, 2, dtype=dtype, device=device)
        inv_freq = theta ** (-exponent / head_dim)  # (hd/2,)
        if scaling is None:
            return inv_freq
        factor, low, high = (scaling["factor"], scaling["low_freq_factor"],
                             scaling["high_freq_factor"])
        old = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        s = (old / wavelength - low) / (high - low)
        scaled = torch.where(wavelength > old / low, inv_freq / factor, inv_freq)
        medium = (wavelength >= old / high) & (wavelength <= old / low)
        return torch.where(medium, (1 - s) * inv_freq / factor + s * inv_freq, scaled)

    def angles(self, pos: torch.Tensor) -> torch.Tensor:
        """The rotation angles at positions pos (T,) int64: (T, head_dim/2) in radians, of
        angle_dtype (float64; float32 on MPS)."""
        dtype = self.angle_dtype(pos.device)
        inv_freq = self.inv_freq(self.head_dim, self.theta, self.scaling, dtype, pos.device)
        return pos.to(dtype)[:, None] * inv_freq[None, :]  # (T, hd/2)

    def cos_sin(self, pos: torch.Tensor):
        """cos and sin of the angles at positions pos (T,): two (T, head_dim/2) float32
        tensors (computed in float64), what the fused QK-norm + RoPE op takes."""
        angles = self.angles(pos)
        return angles.cos().float(), angles.sin().float()

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H, head_dim); pos: (T,) int64 absolute positions. Returns x rotated, in
        x's dtype (bfloat16/float16 are rotated in float32).

        Each pair is the complex number x[2i] + i x[2i+1] times e^(i angle): one complex
        multiply, about 2.5x faster than the real form on a CPU. MPS has no complex dtypes and
        torch.compile generates no code for them: there rotate_real runs.
        """
        angles = self.angles(pos)  # (T, hd/2)
        if x.device.type == "mps" or torch.compiler.is_compiling():
            return self.rotate_real(x, angles)
        real = torch.float64 if x.dtype == torch.float64 else torch.float32
        rotation = torch.polar(torch.ones_like(angles), angles)  # (T, hd/2) e^(i angle)
        rotation = rotation.to(torch.complex128 if real == torch.float64 else torch.complex64)
        xr = x.to(real)
        if xr.stride(-1) != 1 or xr.storage_offset() % 2 or any(st % 2 for st in xr.stride()[:-1]):
            xr = xr.contiguous()  # view_as_complex needs pairs adjacent and aligned
        pairs = torch.view_as_complex(xr.unflatten(-1, (-1, 2)))  # (B, T, H, hd/2)
        out = torch.view_as_real(pairs * rotation[None, :, None, :])  # (B, T, H, hd/2, 2)
        return out.flatten(-2).to(x.dtype)  # (B, T, H, hd)

    @staticmethod
    def rotate_real(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """The same rotation in real arithmetic: x (B, T, H, head_dim) by angles
        (T, head_dim/2) -> (B, T, H, head_dim) in x's dtype."""
        cos = angles.cos().to(x.dtype)[None, :, None, :]  # (1, T, 1, hd/2)
        sin = angles.sin().to(x.dtype)[None, :, None, :]
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, T, H, hd/2) each
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2)  # (B, T, H, hd)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's head slopes (Press et al. 2022, sec. 3, and their code's get_slopes): for n_head
    a power of 2, slope_h = 2^(-8h / n_head), h = 1..n_head (8 heads: 1/2, ..., 1/256); else,
    with n the largest power of 2 below n_head, those n slopes, then the first n_head - n of
    every other slope for 2n heads (6 heads: 1/4, 1/16, 1/64, 1/256, 1/2, 1/8).

    Returns:
        (n_head,) float32 on the CPU (computed in float64): head h adds -slopes[h] * (i - j)
        to the score of query i and key j. With GQA these are per query head.

    Raises:
        ValueError: n_head is not a positive int.
    """
    if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1:
        raise ValueError(f"alibi_slopes: n_head must be a positive int, got {n_head!r}")

    def power_of_2(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    n = 1 << (n_head.bit_length() - 1)  # the largest power of 2 <= n_head
    slopes = power_of_2(n) + power_of_2(2 * n)[0::2][:n_head - n]
    return torch.tensor(slopes, dtype=torch.float64).to(torch.float32)


def sinusoidal_encoding(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. 2017, sec. 3.5: PE[p, 2i] = sin(p / 10000^(2i/dim)),
    PE[p, 2i+1] = cos(p / 10000^(2i/dim)).

    Args:
        pos: (T,) integer positions (any value: there is no table to run out of).
        dim: the width (n_embd); an odd dim ends with a sine column.

    Returns:
        (T, dim) on pos's device, float64 (float32 on MPS).
    """
    dtype = RotaryEmbedding.angle_dtype(pos.device)
    two_i = torch.arange(0, dim, 2, dtype=dtype, device=pos.device)  # (ceil(dim/2),)
    angles = pos.to(dtype)[:, None] / 10000.0 ** (two_i / dim)[None, :]  # (T, ceil(dim/2))
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1)  # (T, ceil(dim/2), 2)
    return pe.flatten(-2)[:, :dim]  # (T, dim): sin, cos, sin, cos, ...


def with_block_size(model: nn.Module, block_size: int,
                    generator: Optional[torch.Generator] = None) -> nn.Module:
    """A copy of a GPT (same weights, device, dtype and train/eval mode; model is unchanged)
    whose config has block_size: it takes contexts up to that length.

    "rope", "sinusoidal", "alibi" and "none" compute positions from a formula: only the limit
    changes. "learned" has one trained row per position: the table is cut to block_size, or
    extended with rows drawn as at initialisation (normal, std 0.02, from generator; default
    seeded with 0) that no training updated (why learned positions cannot extrapolate: Press
    et al. 2022, sec. 2).

    Raises:
        ValueError: block_size is not a positive int.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"GPT.with_block_size: block_size must be a positive int, got "
                         f"{block_size!r}")
    new = copy.deepcopy(model)
    new.config = dataclasses.replace(model.config, block_size=block_size)
    if model.config.pos_embedding == "learned":
        old = model.transformer.wpe.weight.detach()  # (old block_size, C)
        rows = torch.empty(block_size, old.shape[1], dtype=old.dtype)
        n = min(block_size, old.shape[0])
        rows[n:].normal_(0.0, 0.02, generator=generator or torch.Generator().manual_seed(0))
        wpe = nn.Embedding(block_size, old.shape[1], device=old.device, dtype=old.dtype)
        with torch.no_grad():
            wpe.weight.copy_(rows.to(old.device))
            wpe.weight[:n] = old[:n]
        wpe.weight.requires_grad_(model.transformer.wpe.weight.requires_grad)
        new.transformer.wpe = wpe
    return new
