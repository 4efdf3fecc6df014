"""Choosing the next token from logits, and decoding a token stream to text as it arrives."""

from __future__ import annotations

import codecs
from typing import Optional

import torch


def check_sampling_args(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Raise ValueError naming the argument if temperature < 0, top_k < 1 or top_p not in (0, 1]."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample one token id per row of logits.

    Args:
        logits: (B, vocab_size) unnormalised log-probabilities.
        temperature: divides the logits; 0 means greedy (argmax). Default 1.0.
        top_k: keep only the k most likely tokens (Fan et al. 2018). None keeps all.
        top_p: nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely
            tokens whose probabilities sum to at least top_p. None keeps all.
        generator: a torch.Generator for reproducible draws (same seed, same tokens).

    Returns:
        (B, 1) int64 token ids.

    Raises:
        ValueError: temperature < 0, top_k < 1, or top_p outside (0, 1].
    """
    check_sampling_args(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class TextStream:
    """Turns token ids into text as they are generated.

    Tokens are decoded to bytes and fed to an incremental UTF-8 decoder, so a character whose
    bytes are split across two GPT-2 BPE tokens is printed once, whole, when its last byte
    arrives (never as U+FFFD halves).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids) -> str:
        """Add token ids; return the text they complete (possibly empty)."""
        return self._decoder.decode(self.tokenizer.decode_bytes(list(ids)))

    def flush(self) -> str:
        """Return whatever is left (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)
