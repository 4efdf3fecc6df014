"""Generation: the decoding loop over a GPT and its KV cache (generate), choosing the next token
from logits (sample_next), and decoding a token stream to text as it arrives (TextStream)."""

from __future__ import annotations

import codecs
import contextlib
from typing import Optional

import torch
import torch.nn as nn

from minigpt.model import KVCache


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


# A decode step multiplies one token's activations by every weight matrix: it is bound by reading
# the weights. Stored (out, in), as nn.Linear keeps them, F.linear asks BLAS for x @ W^T; MKL runs
# that product markedly slower for a single row than x @ W with W stored (in, out), GPT-2's own
# Conv1D layout: 1.25x on GPT-2 small's blocks and 2x on its 768 x 50257 output head, measured on
# an AMD EPYC (python -m minigpt bench-generate). Switching the layout costs two copies of the
# weights per generate() call, about what 40 decode steps save, hence the threshold.
COLUMN_MAJOR_MIN_TOKENS = 64


@contextlib.contextmanager
def column_major_linears(model: nn.Module, enabled: bool = True):
    """Within the block, every float32 nn.Linear weight of model holds the same (out, in) values
    stored column-major (W.t() contiguous), so that F.linear multiplies by a contiguous (in, out)
    matrix; each weight is made contiguous again on exit. A weight shared by several modules (the
    tied output head and token embedding) is switched once."""
    switched, seen = [], set()
    if enabled:
        for module in model.modules():
            w = getattr(module, "weight", None)
            if (isinstance(module, nn.Linear) and id(w) not in seen and w.dtype == torch.float32
                    and w.is_contiguous()):
                seen.add(id(w))
                w.data = w.data.t().contiguous().t()  # (out, in), strides (1, out)
                switched.append(w)
    try:
        yield
    finally:
        for w in switched:
            w.data = w.data.contiguous()


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             generator: Optional[torch.Generator] = None, use_cache: bool = True,
             callback=None, stop_tokens=None) -> torch.Tensor:
    """Sample max_new_tokens tokens after the prompt idx (B, T) from a GPT, one at a time.

    The model sees the last block_size tokens (nanoGPT's crop). With use_cache (default) each
    step feeds only the newest token and attends to a KVCache until the context fills
    block_size; from then on each step recomputes the last block_size tokens (the cache is
    refilled), so the logits equal a full recompute. Sampling: sample_next (temperature 0 is
    greedy). On the CPU, for max_new_tokens >= COLUMN_MAJOR_MIN_TOKENS, the Linear weights are
    stored column-major while generating (column_major_linears).

    Args:
        callback: callback(step, next_tokens (B, 1)) after each new token; a truthy return ends
            generation there (sample.py's --stop strings).
        stop_tokens: token ids (an end of turn, EOS) that end a sequence, kept in the output;
            a sequence that ended repeats its stop token until all have ended. None or empty:
            always max_new_tokens tokens.

    Returns:
        (B, T + n) int64 ids, n <= max_new_tokens (less only when stopped).

    Raises:
        ValueError: max_new_tokens < 0, a stop token outside [0, vocab_size), or a sampling
            argument out of range (sample_next).
    """
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    stop = None
    if stop_tokens:
        stop = torch.tensor(sorted({int(t) for t in stop_tokens}), device=idx.device)
        if stop.min() < 0 or stop.max() >= model.config.vocab_size:
            raise ValueError(f"generate: stop_tokens must be token ids in [0, "
                             f"{model.config.vocab_size}), got {sorted(stop.tolist())}")
        done = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    bs = model.config.block_size
    cache = KVCache(model.config, idx.shape[0], last_logits_only=True) if use_cache else None
    feed = idx[:, -bs:]
    layout = idx.device.type == "cpu" and max_new_tokens >= COLUMN_MAJOR_MIN_TOKENS
    with column_major_linears(model, layout):
        for step in range(max_new_tokens):
            if cache is None or cache.length + feed.shape[1] > bs:
                feed = idx[:, -bs:]
                if cache is not None:
                    cache.reset()
            logits, _ = model(feed, kv_cache=cache)
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            if stop is not None:
                nxt = torch.where(done, idx[:, -1:], nxt)  # ended rows repeat their stop token
                done = done | torch.isin(nxt, stop)
            idx = torch.cat((idx, nxt), dim=1)
            feed = nxt
            if callback is not None and callback(step, nxt):
                break
            if stop is not None and bool(done.all()):
                break
    return idx
