"""``python -m minigpt experiments length``: a pretrained model's loss against token position, up
to its trained context and past it.

    python -m minigpt experiments length --init-from model.gguf --data alice29.txt --out runs/length

The text gives --sequences sequences of --length tokens, --stride apart (default: consecutive;
a shorter stride overlaps them, so the same text is read inside the context in one sequence and
past it in another); --length defaults to twice the model's context (GPTConfig.block_size,
which a GGUF file's context_length or a config's max_position_embeddings sets). Each runs
through the model in chunks of --chunk tokens against a KV cache (the attention and the cost of
one forward at that length, with one chunk's logits in memory), and every token's next-token
loss is kept. The losses are averaged over the sequences
in buckets of positions: doubling up to --bucket (1, 2, 4, ...), then --bucket wide. Positions
past the context are RoPE extrapolation: rotary angles the model never saw in training
(Press et al. 2022, "Train Short, Test Long", measured this for models trained from scratch).
Writes results.md, results.json and length.png to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import torch
import torch.nn.functional as F

from minigpt.experiments.common import (check_paths, load_pretrained, pretrained_arguments,
                                        text_tokens, write_results)

HELP = "a pretrained model's loss against position, to its context and past it"
SEQUENCES, BUCKET, CHUNK = 2, 256, 1024


@torch.no_grad()
def position_losses(model, tokens, length: int, sequences: int, chunk: int = CHUNK,
                    stride: Optional[int] = None, log=print) -> torch.Tensor:
    """Next-token loss (nats) at every position of sequences sequences of tokens.

    Sequence s is tokens[s * stride : s * stride + length + 1] (stride default length:
    consecutive sequences; a shorter stride overlaps them, so the same text is read at other
    positions): its first length tokens predict the next ones. It runs chunk tokens at a time
    against a KVCache (the same logits as one forward of the whole sequence); past
    model.config.block_size, through model.with_block_size(length).

    Args:
        model: a GPT. tokens: 1-d integers, at least (sequences - 1) * stride + length + 1.
        length, sequences, chunk, stride: positive ints.

    Returns:
        (sequences, length) float64 tensor on the CPU; [s, i] is the loss of predicting token
        i + 1 of sequence s from tokens 0..i.

    Raises:
        ValueError: a non-positive length, sequences, chunk or stride, or too few tokens.
    """
    from minigpt.model import KVCache

    stride = length if stride is None else stride
    for name, value in (("length", length), ("sequences", sequences), ("chunk", chunk),
                        ("stride", stride)):
        if value < 1:
            raise ValueError(f"position_losses: {name} must be >= 1, got {value}")
    need = (sequences - 1) * stride + length + 1
    if len(tokens) < need:
        raise ValueError(f"position_losses: {sequences} sequences of {length} tokens "
                         f"{stride} apart need {need} tokens, got {len(tokens)}")
    m = model if length <= model.config.block_size else model.with_block_size(length)
    m.eval()
    device = next(m.parameters()).device
    out = torch.empty(sequences, length, dtype=torch.float64)
    for s in range(sequences):
        t0 = time.perf_counter()
        ids = torch.as_tensor(tokens[s * stride:s * stride + length + 1], dtype=torch.int64)
        ids = ids.to(device)
        cache = KVCache(m.config, 1)
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            logits, _ = m(ids[None, start:end], kv_cache=cache)  # (1, end - start, vocab)
            out[s, start:end] = F.cross_entropy(logits[0].float(), ids[start + 1:end + 1],
                                                reduction="none").double().cpu()
        log(f"sequence {s + 1}/{sequences}: {length} tokens, mean loss "
            f"{out[s].mean():.4f}, {time.perf_counter() - t0:.0f} s")
    return out


def bucket_edges(length: int, bucket: int) -> List[int]:
    """Bucket boundaries over positions 0..length: 0, 1, 2, 4, ... doubling below bucket, then
    every bucket positions, and length (the last bucket may be shorter). Raises ValueError
    unless 1 <= bucket <= length."""
    if not 1 <= bucket <= length:
        raise ValueError(f"bucket_edges: bucket must be in 1..length {length}, got {bucket}")
    edges, step = [0], 1
    while step < bucket:
        edges.append(step)
        step *= 2
    edges += list(range(bucket, length, bucket)) + [length]
    return sorted(set(edges))


def bucketed(losses: torch.Tensor, bucket: int) -> List[dict]:
    """Mean loss per bucket of positions (bucket_edges) of losses (sequences, length):
    [{"start", "end" (positions [start, end)), "tokens" (counted over all sequences), "loss"
    (mean nats/token), "std" (standard deviation of the sequences' bucket means; 0 for one
    sequence)}]."""
    edges = bucket_edges(losses.shape[1], bucket)
    rows = []
    for start, end in zip(edges[:-1], edges[1:]):
        part = losses[:, start:end]
        means = part.mean(1)
        rows.append(dict(start=start, end=end, tokens=part.numel(), loss=float(part.mean()),
                         std=float(means.std()) if len(means) > 1 else 0.0))
    return rows


def summarize(losses: torch.Tensor, context: int) -> dict:
    """Mean loss (nats/token) over position ranges of losses (sequences, length): the first w
    positions, [w, context), [context, length), and the last w' positions before the context
    and before length, with w = min(128, context / 2) and w' = min(1024, context / 4) (None for
    an empty range)."""
    length = losses.shape[1]
    w, tail = min(128, context // 2), min(1024, context // 4)

    def mean(a: int, b: int) -> Optional[float]:
        a, b = max(0, a), min(b, length)
        return float(losses[:, a:b].mean()) if b > a else None

    return {f"0-{w}": mean(0, w), f"{w}-{context}": mean(w, context),
            f"{context}-{length}": mean(context, length),
            f"last {tail} before {context}": mean(context - tail, context),
            f"last {tail}": mean(length - tail, length) if length > context else None}


def same_tokens(losses: torch.Tensor, stride: int, context: int) -> Optional[dict]:
    """The tokens of the text that overlapping sequences (position_losses with stride <
    length) predict both inside the context (position < context) and past it: {"tokens": how
    many, "inside" and "past": their mean loss (nats/token) at those positions, each token's
    occurrences averaged first}; None when no token is read both ways."""
    sequences, length = losses.shape
    text = (torch.arange(sequences)[:, None] * stride + torch.arange(length)).flatten()
    inside = (torch.arange(length) < context).expand(sequences, length).flatten()
    flat, n = losses.flatten(), int(text.max()) + 1
    means = []
    for mask in (inside, ~inside):
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, text[mask], flat[mask])
        count = torch.zeros(n, dtype=torch.float64).index_add_(
            0, text[mask], torch.ones(int(mask.sum()), dtype=torch.float64))
        means.append((total, count))
    both = (means[0][1] > 0) & (means[1][1] > 0)
    if not both.any():
        return None
    inside_mean, past_mean = ((t[both] / c[both]).mean().item() for t, c in means)
    return {"tokens": int(both.sum()), "inside": inside_mean, "past": past_mean}


def markdown(results: dict) -> str:
    """results (run()'s) as Markdown: the summary, then one row per bucket."""
    ctx = results["context"]
    lines = [f"Loss against position: {results['source']} (context {ctx:,}) on "
             f"{results['sequences']} sequences of {results['length']:,} tokens of "
             f"{results['data']}, starting {results['stride']:,} tokens apart "
             f"({results['seconds_per_sequence']:.0f} s per sequence).", "",
             "| positions | mean loss (nats/token) |", "| --- | --- |"]
    lines += [f"| {k} | {'-' if v is None else f'{v:.4f}'} |"
              for k, v in results["summary"].items()]
    same = results["same_tokens"]
    if same is not None:
        lines += ["", f"The same {same['tokens']:,} tokens of the text, read inside the context "
                  f"and past it: {same['inside']:.4f} and {same['past']:.4f} nats/token."]
    lines += ["", "| positions | tokens | loss | std over sequences |", "| --- | --- | --- | --- |"]
    lines += [f"| {b['start']}-{b['end'] - 1} | {b['tokens']:,} | {b['loss']:.4f} | "
              f"{b['std']:.4f} |" for b in results["buckets"]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path, dpi: int = 110):
    """The bucket means against position: linear axis (bucket midpoints), and log2 axis (at
    midpoint + 1, so that position 0 has a place); the trained context marked."""
    from matplotlib.figure import Figure

    b, ctx = results["buckets"], results["context"]
    mid = [(r["start"] + r["end"] - 1) / 2 for r in b]
    loss = [r["loss"] for r in b]
    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, log in zip(axes, (False, True)):
        x = [m + 1 for m in mid] if log else mid
        ax.plot(x, loss, "o-" if log else "-", ms=3)
        ax.axvline(ctx + 1 if log else ctx, color="gray", ls="--", lw=1,
                   label=f"trained context ({ctx:,})")
        if log:
            ax.set_xscale("log", base=2)
            ticks = [4 ** k for k in range(0, 16) if 4 ** k <= results["length"]]
            ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel("token position + 1 (log axis)" if log else "token position")
        ax.set_ylabel("next-token loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['source']}: loss against position, {results['sequences']} x "
                 f"{results['length']:,} tokens of {results['data']}", fontsize=10)
    fig.savefig(path, dpi=dpi)
    return path


def add_arguments(p: argparse.ArgumentParser, quick: bool = False) -> None:
    """The flags of ``experiments length`` (it has no --quick; quick is ignored)."""
    pretrained_arguments(p, "long UTF-8 text (a book): (sequences - 1) * stride + length + 1 "
                            "tokens from its start")
    p.add_argument("--length", type=int, default=0,
                   help="tokens per sequence (0: twice the model's context)")
    p.add_argument("--sequences", type=int, default=SEQUENCES, help="sequences averaged")
    p.add_argument("--stride", type=int, default=0,
                   help="tokens between the sequences' starts (0: --length, consecutive; less "
                        "overlaps them, so the same text is also read at other positions)")
    p.add_argument("--bucket", type=int, default=BUCKET, help="bucket width in positions")
    p.add_argument("--chunk", type=int, default=CHUNK,
                   help="tokens per forward against the KV cache (memory, not results)")
    p.add_argument("--out", default="runs/length",
                   help="results.md, results.json and length.png go here")


def run(p: argparse.ArgumentParser, args) -> int:
    """Check the flags, load the model and the text, measure, write the results and the curve."""
    from pathlib import Path

    from minigpt.hf.pretrained import PretrainedError

    for flag, value, low in (("--length", args.length, 0), ("--sequences", args.sequences, 1),
                             ("--stride", args.stride, 0),
                             ("--bucket", args.bucket, 1), ("--chunk", args.chunk, 1)):
        if value < low:
            p.error(f"argument {flag}: must be >= {low}, got {value}")
    check_paths(p, args.data, args.out, "--out")
    try:
        model, tokenizer = load_pretrained(args.init_from)
    except (PretrainedError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    context = model.config.block_size
    length = args.length or 2 * context
    if args.bucket > length:
        p.error(f"argument --bucket: at most --length {length}, got {args.bucket}")
    stride = args.stride or length
    tokens = text_tokens(args.data, tokenizer, (args.sequences - 1) * stride + length + 1)
    t0 = time.perf_counter()
    losses = position_losses(model, tokens, length, args.sequences, args.chunk, stride)
    results = dict(source=Path(args.init_from).name, data=Path(args.data).name,
                   context=context, length=length, sequences=args.sequences, stride=stride,
                   seconds_per_sequence=(time.perf_counter() - t0) / args.sequences,
                   summary=summarize(losses, context), buckets=bucketed(losses, args.bucket),
                   same_tokens=same_tokens(losses, stride, context))
    write_results(args.out, results, markdown(results), plot, "length.png")
    return 0
