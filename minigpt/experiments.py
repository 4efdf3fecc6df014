"""Experiments on our own model, each one command that prints a table.

    python -m minigpt.experiments ablation --max-time 60     # each training option on and off
    python -m minigpt.experiments positions --quick           # position encodings, longer contexts

``ablation`` trains the default model once as configured and once with each option turned
back (or, for options the default leaves off, turned on), every run with the same seed, data
and wall-clock budget (TrainConfig.max_time: the schedule runs on the fraction of the budget
used, so every run finishes its schedule), one after another in this process. It prints a
Markdown table of the final validation loss, the steps done and the training throughput, and
writes the same as JSON. Compare rows of one run of the command only: timings from different
machines or moments are not comparable.

``positions`` trains the default model once per position encoding (GPTConfig.pos_embedding:
rope, learned, sinusoidal, alibi, none) at a short context (block_size 64), each with the same
seed, hence the same initial weights where they share parameters and the same batches in the
same order, for the same number of steps, then evaluates each on the same validation tokens cut
into windows of 1x, 2x, 4x and 8x the training context (GPT.with_block_size): every length
predicts the same tokens once each, so the losses differ only by how much context each token
had and how well the model uses positions it never saw in training. Press et al. 2022 ("Train
Short, Test Long") ran this comparison at scale. It writes results.md, results.json and
positions.png (loss against evaluation length) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .config import GPTConfig, TrainConfig, apply_overrides, default_settings

# name -> (what changes against the default, overrides of TrainConfig fields). The default
# turns on Muon (Jordan et al. 2024), QK-norm (Henry et al. 2020), a 30-step warmup and the
# warmup-stable-decay schedule (Hu et al. 2024; Hagele et al. 2024) with momentum 0.9.
ABLATIONS: Dict[str, tuple] = {
    "default": ("the default run", {}),
    "adamw": ("AdamW for every parameter instead of Muon for the hidden matrices",
              {"optimizer": "adamw"}),
    "no_qk_norm": ("no QK-norm", {"model": {"qk_norm": False}}),
    "cosine": ("cosine decay instead of warmup-stable-decay", {"lr_schedule": "cosine"}),
    "warmup_100": ("100 warmup steps instead of 30", {"warmup_iters": 100}),
    "momentum_0.95": ("Muon momentum 0.95 (torch's default) instead of 0.9",
                      {"muon_momentum": 0.95}),
    "relu2": ("ReLU^2 MLP instead of GELU (So et al. 2021)", {"model": {"activation": "relu2"}}),
    "untied_zero_init": ("untied output head, residual projections and head zero-initialised",
                         {"model": {"tie_embeddings": False, "zero_init_proj": True}}),
    "previous_default": ("the previous default: AdamW, cosine, 100 warmup steps, no QK-norm",
                         {"optimizer": "adamw", "lr_schedule": "cosine", "warmup_iters": 100,
                          "model": {"qk_norm": False}}),
}


def ablation(max_time: float, out_dir: str, data: Optional[str], names: List[str],
             log=print) -> List[dict]:
    """Train each named variant of the default for max_time seconds; return one row per run
    (name, change, final_val_loss, iters, tokens_per_s, wall_time_s)."""
    from .training import train

    base = default_settings()
    rows = []
    for name in names:
        change, overrides = ABLATIONS[name]
        settings = apply_overrides(base, overrides)
        cfg = TrainConfig.from_dict(settings)
        cfg = replace(cfg, data=data, out_dir=str(Path(out_dir) / name), max_time=max_time,
                      max_iters=10**9, eval_interval=100, progress=False, overwrite=True)
        result = train(cfg, log=lambda message: None)
        row = dict(name=name, change=change, final_val_loss=round(result.final_val_loss, 4),
                   iters=result.iters, tokens_per_s=round(result.tokens_per_s),
                   wall_time_s=round(result.wall_time_s, 1))
        log(f"{name}: val {row['final_val_loss']:.4f} after {row['iters']} steps, "
            f"{row['tokens_per_s']:,} tokens/s")
        rows.append(row)
    return rows


def markdown(rows: List[dict], max_time: float) -> str:
    """The rows as a Markdown table, with the change in loss against the "default" row."""
    ref = next((r["final_val_loss"] for r in rows if r["name"] == "default"), None)
    lines = [f"| run | change | val loss at {max_time:g} s | vs default | steps | tokens/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        delta = "" if ref is None or r["name"] == "default" else f"{r['final_val_loss'] - ref:+.4f}"
        lines.append(f"| `{r['name']}` | {r['change']} | {r['final_val_loss']:.4f} | {delta} | "
                     f"{r['iters']} | {r['tokens_per_s']:,} |")
    return "\n".join(lines)


# pos_embedding -> what it is, for the table.
ENCODINGS: Dict[str, str] = {
    "rope": "rotary q/k (Su et al. 2021)",
    "learned": "learned absolute table (GPT-2)",
    "sinusoidal": "fixed sin/cos absolute (Vaswani et al. 2017)",
    "alibi": "linear distance bias (Press et al. 2022)",
    "none": "no position encoding (NoPE), causal mask only",
}
assert tuple(ENCODINGS) == GPTConfig.POS_EMBEDDINGS
FACTORS = (1, 2, 4, 8)  # evaluation lengths, as multiples of the training context
# --quick: (steps per encoding, evaluation tokens); the defaults are (600, 32768).
QUICK = (150, 8192)


def eval_at_lengths(model, tokens, lengths: Sequence[int], n_tokens: int, device="cpu",
                    batch_tokens: int = 16384) -> Dict[int, float]:
    """Mean next-token loss (nats per token) of model on tokens[1 : n_tokens + 1], read in
    consecutive windows of each length L: tokens[s : s + L] predict tokens[s + 1 : s + L + 1]
    for s = 0, L, 2L, ... Every length predicts the same n_tokens tokens once each (n_tokens
    must be a multiple of every length). Lengths past model.config.block_size are evaluated
    with model.with_block_size(L).

    Args:
        model: a GPT, in eval mode. tokens: 1-d integer array (a corpus split) of at least
        n_tokens + 1 tokens. batch_tokens: about how many tokens go through one forward.

    Raises:
        ValueError: n_tokens not a positive multiple of every length, or more than tokens has.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    if n_tokens < 1 or any(n_tokens % L for L in lengths):
        raise ValueError(f"eval_at_lengths: n_tokens must be a positive multiple of every "
                         f"length {list(lengths)}, got {n_tokens}")
    if len(tokens) < n_tokens + 1:
        raise ValueError(f"eval_at_lengths: n_tokens + 1 = {n_tokens + 1} tokens needed, the "
                         f"split has {len(tokens)}")
    span = torch.from_numpy(np.asarray(tokens[:n_tokens + 1], dtype=np.int64)).to(device)
    losses = {}
    with torch.no_grad():
        for L in lengths:
            m = model if L <= model.config.block_size else model.with_block_size(L)
            x = span[:-1].view(-1, L)  # (n_tokens / L, L)
            y = span[1:].view(-1, L)
            total = 0.0
            per_batch = max(1, batch_tokens // L)
            for i in range(0, x.shape[0], per_batch):
                logits, _ = m(x[i:i + per_batch])  # (B, L, V)
                total += F.cross_entropy(logits.flatten(0, 1).float(),
                                         y[i:i + per_batch].reshape(-1), reduction="sum").item()
            losses[L] = total / n_tokens
    return losses


def positions(encodings: Sequence[str], out_dir: str, data: Optional[str], *,
              block_size: int = 64, max_iters: int = 600, max_time: float = 0.0,
              eval_tokens: int = 32768, window: Optional[int] = None,
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
    from .checkpoint import load_checkpoint
    from .data import load_corpus
    from .model import GPT
    from .runtime import pick_device
    from .training import train

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
        result = train(cfg, log=lambda message: None)
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


def positions_markdown(results: dict) -> str:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minigpt.experiments",
                                description="Experiments on minigpt's own model.")
    sub = p.add_subparsers(dest="experiment", required=True)
    a = sub.add_parser("ablation", help="each training option on and off at a fixed wall time")
    a.add_argument("--max-time", type=float, default=60.0,
                   help="wall-clock seconds per run (default 60)")
    a.add_argument("--runs", nargs="+", choices=list(ABLATIONS), default=list(ABLATIONS),
                   help="which variants (default: all)")
    a.add_argument("--data", default=None, help="UTF-8 text file (default: tiny Shakespeare)")
    a.add_argument("--out-dir", default="runs/ablation",
                   help="parent of each run's directory; results.json and results.md go here")
    q = sub.add_parser("positions", help="each position encoding trained at a short context, "
                                         "evaluated at 1x-8x that context")
    q.add_argument("--encodings", nargs="+", choices=list(ENCODINGS), default=list(ENCODINGS),
                   help="which pos_embedding values (default: all)")
    q.add_argument("--block-size", type=int, default=64,
                   help="training context in tokens; evaluated at 1x, 2x, 4x, 8x (default 64)")
    q.add_argument("--max-iters", type=int, default=None,
                   help=f"training steps per encoding (default 600; {QUICK[0]} with --quick)")
    q.add_argument("--max-time", type=float, default=0.0,
                   help="also stop each run after this many seconds (default 0: no limit; the "
                        "same steps for every encoding is the fairer budget)")
    q.add_argument("--eval-tokens", type=int, default=None,
                   help=f"validation tokens predicted at every length (default 32768; "
                        f"{QUICK[1]} with --quick)")
    q.add_argument("--window", type=int, default=None,
                   help="sliding-window attention in every run (GPTConfig.window; default none)")
    q.add_argument("--quick", action="store_true",
                   help=f"{QUICK[0]} steps and {QUICK[1]} evaluation tokens: a few minutes on "
                        f"2 CPU cores")
    q.add_argument("--data", default=None, help="UTF-8 text file (default: tiny Shakespeare)")
    q.add_argument("--out", "--out-dir", dest="out", default="runs/positions",
                   help="parent of each run's directory; results.md, results.json and "
                        "positions.png go here (default runs/positions)")
    args = p.parse_args(argv)
    if args.experiment == "positions":
        return _positions_main(p, args)
    if args.max_time <= 0:
        p.error(f"argument --max-time: must be > 0, got {args.max_time}")
    rows = ablation(args.max_time, args.out_dir, args.data, args.runs)
    table = markdown(rows, args.max_time)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    print(table)
    return 0


def _positions_main(p: argparse.ArgumentParser, args) -> int:
    max_iters = args.max_iters if args.max_iters is not None else (QUICK[0] if args.quick else 600)
    eval_tokens = (args.eval_tokens if args.eval_tokens is not None
                   else (QUICK[1] if args.quick else 32768))
    for flag, value, ok in (("--block-size", args.block_size, args.block_size >= 1),
                            ("--max-iters", max_iters, max_iters >= 1),
                            ("--max-time", args.max_time, args.max_time >= 0),
                            ("--eval-tokens", eval_tokens, eval_tokens >= 8 * args.block_size),
                            ("--window", args.window, args.window is None or args.window >= 1)):
        if not ok:
            need = (f">= 8 x --block-size = {8 * args.block_size}" if flag == "--eval-tokens"
                    else ">= 0" if flag == "--max-time" else ">= 1")
            p.error(f"argument {flag}: must be {need}, got {value}")
    results = positions(args.encodings, args.out, args.data, block_size=args.block_size,
                        max_iters=max_iters, max_time=args.max_time, eval_tokens=eval_tokens,
                        window=args.window)
    table = positions_markdown(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    from .visualize import plot_extrapolation

    plot_extrapolation(results, out / "positions.png")
    print(table)
    print(f"{out / 'results.md'}, {out / 'results.json'}, {out / 'positions.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
