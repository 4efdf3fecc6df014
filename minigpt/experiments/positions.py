"""``python -m minigpt experiments positions``: position encodings, evaluated past their context.

Trains the default model once per position encoding (GPTConfig.pos_embedding: rope, learned,
sinusoidal, alibi, none) at a short context (block_size 64), each with the same seed, hence the
same initial weights where they share parameters and the same batches in the same order, for
the same number of steps, then evaluates each on the same validation tokens cut into windows of
1x, 2x, 4x and 8x the training context (GPT.with_block_size): every length predicts the same
tokens once each, so the losses differ only by how much context each token had and how well the
model uses positions it never saw in training. Press et al. 2022 ("Train Short, Test Long") ran
this comparison at scale. Writes results.md, results.json and positions.png (loss against
evaluation length) to --out.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Sequence, get_args

from minigpt.config import GPTConfig, PosEmbedding
from minigpt.train.config import TrainConfig, apply_overrides, default_settings
from minigpt.experiments.common import check_paths, even_batches, train_run, write_results

HELP = "each position encoding trained at a short context, evaluated at 1x-8x that context"

# pos_embedding -> what it is, for the table.
ENCODINGS: Dict[str, str] = {
    "rope": "rotary q/k (Su et al. 2021)",
    "learned": "learned absolute table (GPT-2)",
    "sinusoidal": "fixed sin/cos absolute (Vaswani et al. 2017)",
    "alibi": "linear distance bias (Press et al. 2022)",
    "none": "no position encoding (NoPE), causal mask only",
}
assert tuple(ENCODINGS) == get_args(PosEmbedding)
FACTORS = (1, 2, 4, 8)  # evaluation lengths, as multiples of the training context
MAX_ITERS, EVAL_TOKENS = 600, 32768  # steps per encoding, evaluation tokens
QUICK = dict(max_iters=150, eval_tokens=8192)  # --quick: a few minutes on 2 CPU cores


def eval_at_lengths(model, tokens, lengths: Sequence[int], n_tokens: int, device="cpu",
                    batch_tokens: int = 16384) -> Dict[int, float]:
    """Mean next-token loss (nats per token) of model on tokens[1 : n_tokens + 1], read in
    consecutive windows of each length L: tokens[s : s + L] predict tokens[s + 1 : s + L + 1]
    for s = 0, L, 2L, ... (minigpt.train.loop.mean_loss over them). Every length predicts the
    same n_tokens tokens once each (n_tokens must be a multiple of every length). Lengths past
    model.config.block_size are evaluated with model.with_block_size(L).

    Args:
        model: a GPT. tokens: 1-d integer array (a corpus split) of at least n_tokens + 1
        tokens. batch_tokens: about how many tokens go through one forward, at most.

    Raises:
        ValueError: n_tokens not a positive multiple of every length, or more than tokens has.
    """
    import numpy as np
    import torch

    from minigpt.train.loop import mean_loss

    if n_tokens < 1 or any(n_tokens % L for L in lengths):
        raise ValueError(f"eval_at_lengths: n_tokens must be a positive multiple of every "
                         f"length {list(lengths)}, got {n_tokens}")
    if len(tokens) < n_tokens + 1:
        raise ValueError(f"eval_at_lengths: n_tokens + 1 = {n_tokens + 1} tokens needed, the "
                         f"split has {len(tokens)}")
    span = torch.from_numpy(np.asarray(tokens[:n_tokens + 1], dtype=np.int64)).to(device)
    losses = {}
    for L in lengths:
        m = model if L <= model.config.block_size else model.with_block_size(L)
        x = span[:-1].view(-1, L)  # (n_tokens / L, L)
        y = span[1:].view(-1, L)
        losses[L] = mean_loss(m, even_batches(x, y, max(1, batch_tokens // L))).item()
    return losses


def positions(encodings: Sequence[str], out_dir: str, data: Optional[str], *,
              block_size: int = 64, max_iters: int = MAX_ITERS, max_time: float = 0.0,
              eval_tokens: int = EVAL_TOKENS, window: Optional[int] = None,
              factors: Sequence[int] = FACTORS, log=print) -> dict:
    """Train the default model with each position encoding at block_size for max_iters steps
    (and at most max_time seconds, if > 0), then evaluate it at each factor x block_size on the
    same validation tokens (eval_at_lengths; eval_tokens is rounded down to a multiple of the
    longest length, and to what the split holds).

    Returns:
        {"block_size", "lengths", "eval_tokens", "max_iters", "max_time", "window", "rows"}:
        rows has one dict per encoding: name, change, iters, tokens_per_s, wall_time_s and
        val_loss, {str(length): nats per token}.
    """
    from minigpt.checkpoint import load_checkpoint
    from minigpt.model import GPT
    from minigpt.runtime import pick_device
    from minigpt.train.data import load_corpus

    lengths = [f * block_size for f in factors]
    base = default_settings()
    rows, val = [], None
    for name in encodings:
        settings = apply_overrides(base, {"model": {"pos_embedding": name,
                                                    "block_size": block_size,
                                                    "window": window}})
        cfg = TrainConfig.from_dict(settings)
        cfg = replace(cfg, data=data, out_dir=str(Path(out_dir) / name), max_iters=max_iters,
                      max_time=max_time, eval_interval=100, progress=False, overwrite=True)
        result = train_run(cfg)
        if val is None:
            val = load_corpus(data, cfg.tokenizer).val
            eval_tokens = min(eval_tokens, len(val) - 1) // lengths[-1] * lengths[-1]
        device = pick_device(cfg.device)
        model = GPT.from_checkpoint(load_checkpoint(result.checkpoint)).to(device).eval()
        losses = eval_at_lengths(model, val, lengths, eval_tokens, device)
        row = dict(name=name, change=ENCODINGS[name], iters=result.iters,
                   tokens_per_s=round(result.tokens_per_s),
                   wall_time_s=round(result.wall_time_s, 1),
                   val_loss={str(L): round(v, 4) for L, v in losses.items()})
        log(f"{name}: {result.iters} steps, {row['tokens_per_s']:,} tokens/s; val loss "
            + ", ".join(f"{v:.4f} at {L}" for L, v in losses.items()))
        rows.append(row)
    return dict(block_size=block_size, lengths=lengths, eval_tokens=eval_tokens,
                max_iters=max_iters, max_time=max_time, window=window, rows=rows)


def markdown(results: dict) -> str:
    """results (from positions()) as a Markdown table: one row per encoding, one loss column
    per evaluation length."""
    bs, lengths = results["block_size"], results["lengths"]
    head = " | ".join(f"{L} ({L // bs}x)" for L in lengths)
    lines = [f"| encoding | what | steps | tokens/s | {head} |",
             "| --- | --- | --- | --- |" + " --- |" * len(lengths)]
    for r in results["rows"]:
        cells = " | ".join(f"{r['val_loss'][str(L)]:.4f}" for L in lengths)
        lines.append(f"| `{r['name']}` | {r['change']} | {r['iters']} | "
                     f"{r['tokens_per_s']:,} | {cells} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser, quick: bool = False) -> None:
    """The flags of ``experiments positions``; quick: the defaults that --quick gives."""
    d = QUICK if quick else dict(max_iters=MAX_ITERS, eval_tokens=EVAL_TOKENS)
    p.add_argument("--encodings", nargs="+", choices=list(ENCODINGS), default=list(ENCODINGS),
                   help="which pos_embedding values")
    p.add_argument("--block-size", type=int, default=64,
                   help="training context in tokens; evaluated at 1x, 2x, 4x, 8x")
    p.add_argument("--max-iters", type=int, default=d["max_iters"],
                   help=f"training steps per encoding ({QUICK['max_iters']} with --quick)")
    p.add_argument("--max-time", type=float, default=0.0,
                   help="also stop each run after this many seconds (0: no limit; the same "
                        "steps for every encoding is the fairer budget)")
    p.add_argument("--eval-tokens", type=int, default=d["eval_tokens"],
                   help=f"validation tokens predicted at every length ({QUICK['eval_tokens']} "
                        f"with --quick)")
    p.add_argument("--window", type=int, default=None,
                   help="sliding-window attention in every run (GPTConfig.window; None: full)")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['max_iters']} steps and {QUICK['eval_tokens']} evaluation "
                        f"tokens: a few minutes on 2 CPU cores")
    p.add_argument("--data", default=None, help="UTF-8 text file; None: tiny Shakespeare")
    p.add_argument("--out", "--out-dir", dest="out", default="runs/positions",
                   help="parent of each run's directory; results.md, results.json and "
                        "positions.png go here")


def run(p: argparse.ArgumentParser, args) -> int:
    """Check the paths and numbers, train and evaluate every encoding, write the results."""
    check_paths(p, args.data, args.out, "--out")
    for flag, value, ok in (("--block-size", args.block_size, args.block_size >= 1),
                            ("--max-iters", args.max_iters, args.max_iters >= 1),
                            ("--max-time", args.max_time, args.max_time >= 0),
                            ("--eval-tokens", args.eval_tokens,
                             args.eval_tokens >= 8 * args.block_size),
                            ("--window", args.window, args.window is None or args.window >= 1)):
        if not ok:
            need = (f">= 8 x --block-size = {8 * args.block_size}" if flag == "--eval-tokens"
                    else ">= 0" if flag == "--max-time" else ">= 1")
            p.error(f"argument {flag}: must be {need}, got {value}")
    results = positions(args.encodings, args.out, args.data, block_size=args.block_size,
                        max_iters=args.max_iters, max_time=args.max_time,
                        eval_tokens=args.eval_tokens, window=args.window)
    from minigpt.analysis.curves import plot_extrapolation

    write_results(args.out, results, markdown(results), plot_extrapolation, "positions.png")
    return 0

