"""Experiments on our own model, each one command that prints a table.

    python -m minigpt experiments ablation --max-time 60     # each training option on and off
    python -m minigpt experiments positions --quick           # position encodings, longer contexts
    python -m minigpt experiments window --quick              # sliding window: cost and loss

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

``window`` measures what a sliding window (GPTConfig.window; Beltagy et al. 2020) saves and
what it costs. Cost: forward+backward of attention() alone at the default model's head shape
(B 1, n_head heads of head_dim), full causal against each window W, on the same inputs, for T
up to 8192: median time and peak memory (minigpt.bench.profile's measurements), the variants timed in
turn at each T; and the time of one whole training step (forward, backward, optimizer) of the
default model shape at block_size T, batch 1. The compiled kernels skip key tiles outside the
window, so the full causal time grows as T^2 and the windowed one as T * W. Loss: the default
model trained at block_size 256 with full attention and with small windows, the same seed,
batches and steps, final validation loss. It writes results.md, results.json and window.png to
--out.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from minigpt.checkpoint import atomic_write_text
from minigpt.config import ConfigError, GPTConfig, TrainConfig, apply_overrides, default_settings
from minigpt.runtime import (ArgumentParser, DeviceError, PathError, check_cache_dir, check_dir_target,
                      check_input_file, cli_main, os_error_message)

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
    "lr_2e-3": ("peak learning rate 2e-3 (Muon 0.02) instead of 3e-3 (Muon 0.03)",
                {"learning_rate": 2e-3}),
    "float32": ("float32 instead of bf16 autocast (dtype auto on a CPU with bf16 "
                "instructions)", {"dtype": "float32"}),
    "previous_default": ("the previous default: AdamW, cosine, 100 warmup steps, no QK-norm, "
                         "float32",
                         {"optimizer": "adamw", "lr_schedule": "cosine", "warmup_iters": 100,
                          "learning_rate": 2e-3, "dtype": "float32",
                          "model": {"qk_norm": False}}),
}


def ablation(max_time: float, out_dir: str, data: Optional[str], names: List[str],
             log=print) -> List[dict]:
    """Train each named variant of the default for max_time seconds; return one row per run
    (name, change, final_val_loss, iters, tokens_per_s, wall_time_s)."""
    base = default_settings()
    rows = []
    for name in names:
        change, overrides = ABLATIONS[name]
        settings = apply_overrides(base, overrides)
        cfg = TrainConfig.from_dict(settings)
        cfg = replace(cfg, data=data, out_dir=str(Path(out_dir) / name), max_time=max_time,
                      max_iters=10**9, eval_interval=100, progress=False, overwrite=True)
        result = _train(cfg)
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
    from minigpt.checkpoint import load_checkpoint
    from minigpt.train.data import load_corpus
    from minigpt.model import GPT
    from minigpt.runtime import pick_device

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
        result = _train(cfg)
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

# window: sequence lengths and windows of the cost measurement, the windows of the loss runs,
# the training context of those runs and their steps.
WINDOW_SEQS = (256, 512, 1024, 2048, 4096, 8192)
WINDOW_SIZES = (64, 256)
STEP_MAX_SEQ = 2048
LOSS_WINDOWS = (32, 64)
LOSS_BLOCK_SIZE = 256
# 8 sequences of 256 tokens: the default preset's 2048 tokens per step (32 x 64).
LOSS_BATCH_SIZE = 8
TRAIN_ITERS = 200
# --quick: shorter sequences, fewer repeats and steps (under a minute on 2 CPU cores).
WINDOW_QUICK = dict(seqs=(256, 512, 1024, 2048), step_max_seq=512, train_iters=30, repeats=3)


def variant_name(window: Optional[int]) -> str:
    """"full" for window None, else "window W"."""
    return "full" if window is None else f"window {window}"


def attention_step(q, k, v, dout, window: Optional[int], backend: str):
    """The function the attention cost is timed on: step() runs one causal forward of
    attention(q, k, v, window=window, backend=backend) and its backward with upstream gradient
    dout, and returns (out, (dq, dk, dv)). q, k, v: (B, H, T, D), dout like q."""
    import torch

    from minigpt.attention import attention

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def step():
        out = attention(*leaves, causal=True, window=window, backend=backend)
        return out, torch.autograd.grad(out, leaves, dout)

    return step


def _time_in_turn(fns: Dict[str, object], device, warmup: int, repeats: int) -> Dict[str, float]:
    """Median seconds of each fn() after warmup calls of each; every repeat times each fn once,
    in turn, so that a burst of load on a shared machine hits them alike."""
    import statistics

    from minigpt.bench.machine import time_fn

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_fn(fn, device, 0, 1))
    return {name: statistics.median(t) for name, t in times.items()}


def _with_ratios(rows: List[dict], keys: Sequence[str]) -> List[dict]:
    """Add key + "_vs_full" (the row's value over the full row's at the same T) to each row."""
    full = {r["T"]: r for r in rows if r["window"] is None}
    for r in rows:
        for key in keys:
            base = full[r["T"]][key]
            r[f"{key}_vs_full"] = round(r[key] / base, 4) if base else None
    return rows


def attention_cost(seqs: Sequence[int], windows: Sequence[int], *, n_head: int, head_dim: int,
                   device, dtype, backend: str = "ext", warmup: int = 1, repeats: int = 5,
                   log=print) -> List[dict]:
    """Forward+backward of attention() (B 1, n_head heads of head_dim, causal) at each T: full
    and each window, on the same random inputs, timed in turn (median ms) and measured for peak
    memory (minigpt.bench.machine.peak_memory: allocations above what was allocated before, inputs
    excluded). One row per (T, variant): T, variant, window, ms, peak_mib, and ms_vs_full,
    peak_mib_vs_full."""
    import torch

    from minigpt.bench.machine import peak_memory

    rows = []
    for T in seqs:
        g = torch.Generator().manual_seed(T)
        # The model's layout: (B, T, H, D) transposed to (B, H, T, D), no copy.
        q, k, v = (torch.randn(1, T, n_head, head_dim, generator=g).transpose(1, 2)
                   .to(device=device, dtype=dtype) for _ in range(3))
        dout = torch.randn(1, n_head, T, head_dim, generator=g).to(device=device, dtype=dtype)
        variants = [None] + [W for W in windows if W < T]
        fns = {variant_name(W): attention_step(q, k, v, dout, W, backend) for W in variants}
        times = _time_in_turn(fns, device, warmup, repeats)
        case = []
        for W in variants:
            name = variant_name(W)
            case.append(dict(T=T, variant=name, window=W, ms=round(times[name] * 1e3, 3),
                             peak_mib=round(peak_memory(fns[name], device) / 2**20, 3)))
        rows += _with_ratios(case, ("ms", "peak_mib"))
        log(f"attention T={T}: " + ", ".join(
            f"{r['variant']} {r['ms']:.2f} ms {r['peak_mib']:.1f} MiB" for r in case))
    return rows


def step_cost(seqs: Sequence[int], windows: Sequence[int], *, device, warmup: int = 1,
              repeats: int = 5, log=print) -> List[dict]:
    """One training step (forward, backward, gradient clipping, optimizer step) of the default
    model and optimizer at block_size T, batch 1, on random tokens: full and each window, the
    same initial weights, timed in turn (median ms). One row per (T, variant): T, variant,
    window, ms, ms_vs_full."""
    import torch

    from minigpt.model import GPT
    from minigpt.train.optim import build_optimizer

    rows = []
    for T in seqs:
        variants = [None] + [W for W in windows if W < T]
        fns = {}
        for W in variants:
            cfg = TrainConfig.from_dict(apply_overrides(
                default_settings(), {"model": {"block_size": T, "window": W}}))
            torch.manual_seed(cfg.seed)
            model = GPT(cfg.model).to(device)
            optimizer = build_optimizer(model, cfg, torch.device(device).type)
            g = torch.Generator().manual_seed(T)
            tokens = torch.randint(0, cfg.model.vocab_size, (1, T + 1), generator=g).to(device)
            fns[variant_name(W)] = partial(_train_step, model, optimizer, tokens, cfg.grad_clip)
        times = _time_in_turn(fns, torch.device(device), warmup, repeats)
        case = [dict(T=T, variant=variant_name(W), window=W,
                     ms=round(times[variant_name(W)] * 1e3, 3)) for W in variants]
        rows += _with_ratios(case, ("ms",))
        log(f"training step T={T}: " + ", ".join(f"{r['variant']} {r['ms']:.1f} ms"
                                                 for r in case))
    return rows


def _train_step(model, optimizer, tokens, grad_clip: float) -> None:
    import torch

    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def window_losses(windows: Sequence[Optional[int]], out_dir: str, data: Optional[str], *,
                  block_size: int = LOSS_BLOCK_SIZE, batch_size: int = LOSS_BATCH_SIZE,
                  max_iters: int = TRAIN_ITERS, device: str = "auto", log=print) -> List[dict]:
    """Train the default model at block_size (batch_size sequences per step) for max_iters
    steps once per window (None: full attention), the same seed, hence the same initial
    weights and batches; one row per run: variant, window, final_val_loss, val_loss_vs_full
    (the difference), iters, tokens_per_s, wall_time_s."""

    rows = []
    for W in windows:
        settings = apply_overrides(default_settings(), {"model": {"block_size": block_size,
                                                                  "window": W}})
        cfg = replace(TrainConfig.from_dict(settings), data=data, device=device,
                      batch_size=batch_size,
                      out_dir=str(Path(out_dir) / variant_name(W).replace(" ", "_")),
                      max_iters=max_iters, eval_interval=max_iters, progress=False,
                      overwrite=True)
        result = _train(cfg)
        rows.append(dict(variant=variant_name(W), window=W,
                         final_val_loss=round(result.final_val_loss, 4), iters=result.iters,
                         tokens_per_s=round(result.tokens_per_s),
                         wall_time_s=round(result.wall_time_s, 1)))
        log(f"{variant_name(W)}: val {rows[-1]['final_val_loss']:.4f} after {result.iters} "
            f"steps, {rows[-1]['tokens_per_s']:,} tokens/s")
    full = next((r["final_val_loss"] for r in rows if r["window"] is None), None)
    for r in rows:
        r["val_loss_vs_full"] = None if full is None else round(r["final_val_loss"] - full, 4)
    return rows


def _cells(rows: List[dict], T: int, variants: Sequence[str], key: str, fmt: str) -> str:
    by = {r["variant"]: r for r in rows if r["T"] == T}
    cells = []
    for name in variants:
        r = by.get(name)
        if r is None:
            cells.append("")
        elif r["window"] is None:
            cells.append(format(r[key], fmt))
        else:
            cells.append(f"{format(r[key], fmt)} ({r[key + '_vs_full']:.2f}x)")
    return " | ".join(cells)


def window_markdown(results: dict) -> str:
    """results (from the window command) as three Markdown tables: attention time and peak
    memory per T, training-step time per T (ratios to full in brackets), and val losses."""
    s = results["setup"]
    variants = [variant_name(None)] + [variant_name(W) for W in s["windows"]]
    att, step = results["attention"], results["step"]
    out = [f"Attention forward+backward: B 1, {s['n_head']} heads, head dim {s['head_dim']}, "
           f"{s['dtype']}, backend `{s['backend']}`, {s['device']}; median of {s['repeats']} "
           f"runs (ratio to full in brackets).", "",
           "| T | " + " | ".join(f"{v} ms" for v in variants) + " | "
           + " | ".join(f"{v} MiB" for v in variants) + " |",
           "| ---: |" + " ---: |" * (2 * len(variants))]
    for T in sorted({r["T"] for r in att}):
        out.append(f"| {T} | {_cells(att, T, variants, 'ms', '.2f')} | "
                   f"{_cells(att, T, variants, 'peak_mib', '.1f')} |")
    if step:
        out += ["", f"One training step (forward, backward, optimizer) of the default model at "
                    f"block_size T, batch 1; median of {s['repeats']} runs.", "",
                "| T | " + " | ".join(f"{v} ms" for v in variants) + " |",
                "| ---: |" + " ---: |" * len(variants)]
        for T in sorted({r["T"] for r in step}):
            out.append(f"| {T} | {_cells(step, T, variants, 'ms', '.1f')} |")
    loss = results.get("loss")
    if loss:
        out += ["", f"Final val loss of the default model trained at block_size "
                    f"{loss['block_size']}, batch {loss['batch_size']}, for {loss['max_iters']} "
                    f"steps, the same seed and batches.",
                "", "| attention | val loss | vs full | steps | tokens/s |",
                "| --- | ---: | ---: | ---: | ---: |"]
        for r in loss["rows"]:
            delta = "" if r["window"] is None else f"{r['val_loss_vs_full']:+.4f}"
            out.append(f"| {r['variant']} | {r['final_val_loss']:.4f} | {delta} | {r['iters']} | "
                       f"{r['tokens_per_s']:,} |")
    return "\n".join(out)


def _train(cfg: TrainConfig):
    """train(cfg) quietly; a Ctrl-C, which train() answers by saving the run, ends the whole
    experiment rather than only this run (KeyboardInterrupt)."""
    from minigpt.train.loop import train

    result = train(cfg, log=lambda message: None)
    if result.interrupted:
        raise KeyboardInterrupt
    return result


@cli_main
def main(argv=None) -> int:
    """The command line; every path is checked before the first run starts, and bad input
    (data, paths, device) ends in one line with exit code 2."""
    from minigpt.train.data import DataError
    from minigpt.train.rundir import RunDirError

    try:
        return _main(argv)
    except (DataError, PathError, RunDirError, DeviceError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 2


def _check_paths(p: argparse.ArgumentParser, data, out, out_flag: str) -> None:
    """--data a regular readable file, the output directory writable, the cache usable:
    refused before any training starts."""
    try:
        if data is not None:
            check_input_file(data, "--data")
        check_dir_target(out, out_flag)
        check_cache_dir()
    except PathError as e:
        p.error(f"argument {e}")


def _main(argv=None) -> int:
    p = ArgumentParser(prog="python -m minigpt experiments",
                                description="Experiments on minigpt's own model.")
    sub = p.add_subparsers(dest="experiment", required=True)
    sub.add_parser("coreference", add_help=False,
                   help="does a pretrained model's attention resolve \"it\"? (see "
                        "minigpt/coreference.py; its own --help)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["coreference"]:
        from minigpt.experiments.coreference import main as coreference_main

        return coreference_main(argv[1:])
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
    w = sub.add_parser("window", help="sliding-window attention: time and memory against T, "
                                      "training-step time, and the loss it costs")
    w.add_argument("--seq", type=int, nargs="+", default=None,
                   help=f"sequence lengths T of the attention measurement (default "
                        f"{' '.join(map(str, WINDOW_SEQS))}; "
                        f"{' '.join(map(str, WINDOW_QUICK['seqs']))} with --quick)")
    w.add_argument("--windows", type=int, nargs="+", default=list(WINDOW_SIZES),
                   help=f"windows W compared with full causal attention (default "
                        f"{' '.join(map(str, WINDOW_SIZES))}); a W >= T is skipped at that T")
    w.add_argument("--step-max-seq", type=int, default=None,
                   help=f"time the training step at the T values up to this (default "
                        f"{STEP_MAX_SEQ}; {WINDOW_QUICK['step_max_seq']} with --quick; 0: none)")
    w.add_argument("--loss-windows", type=int, nargs="+", default=list(LOSS_WINDOWS),
                   help=f"windows of the loss runs, each against full attention (default "
                        f"{' '.join(map(str, LOSS_WINDOWS))})")
    w.add_argument("--block-size", type=int, default=LOSS_BLOCK_SIZE,
                   help=f"training context of the loss runs (default {LOSS_BLOCK_SIZE})")
    w.add_argument("--batch-size", type=int, default=LOSS_BATCH_SIZE,
                   help=f"sequences per step of the loss runs (default {LOSS_BATCH_SIZE})")
    w.add_argument("--train-iters", type=int, default=None,
                   help=f"training steps of each loss run (default {TRAIN_ITERS}; "
                        f"{WINDOW_QUICK['train_iters']} with --quick; 0: no loss runs)")
    w.add_argument("--device", default="cpu", help="device of every measurement (default cpu)")
    w.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for every measurement (default: torch's)")
    w.add_argument("--warmup", type=int, default=1, help="untimed runs of each variant (default 1)")
    w.add_argument("--repeats", type=int, default=None,
                   help=f"timed runs of each variant, median reported (default 5; "
                        f"{WINDOW_QUICK['repeats']} with --quick)")
    w.add_argument("--quick", action="store_true",
                   help="shorter sequences, fewer repeats and training steps: under a minute "
                        "on 2 CPU cores")
    w.add_argument("--data", default=None, help="UTF-8 text file (default: tiny Shakespeare)")
    w.add_argument("--out", "--out-dir", dest="out", default="runs/window",
                   help="results.md, results.json and window.png go here, and the loss runs' "
                        "directories (default runs/window)")
    args = p.parse_args(argv)
    out = args.out_dir if args.experiment == "ablation" else args.out
    _check_paths(p, args.data, out, "--out-dir" if args.experiment == "ablation" else "--out")
    if args.experiment == "positions":
        return _positions_main(p, args)
    if args.experiment == "window":
        return _window_main(p, args)
    if args.max_time <= 0:
        p.error(f"argument --max-time: must be > 0, got {args.max_time}")
    rows = ablation(args.max_time, args.out_dir, args.data, args.runs)
    write_results(args.out_dir, rows, markdown(rows, args.max_time))
    return 0


def write_results(out_dir, results, table: str, plot=None, png_name: str = "") -> None:
    """An experiment's outputs in out_dir: results.json (results), results.md (table) and, with
    plot, png_name drawn by plot(results, path); each file written atomically. Prints the table
    and the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.md", out / "results.json"]
    atomic_write_text(paths[0], table + "\n")
    atomic_write_text(paths[1], json.dumps(results, indent=2) + "\n")
    if plot is not None:
        paths.append(out / png_name)
        plot(results, paths[-1])
    print(table)
    print(", ".join(str(path) for path in paths))


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
    from minigpt.analysis.pictures import plot_extrapolation

    write_results(args.out, results, positions_markdown(results), plot_extrapolation,
                  "positions.png")
    return 0


def _window_main(p: argparse.ArgumentParser, args) -> int:
    import torch

    from minigpt.attention import unavailable_reason

    quick = WINDOW_QUICK if args.quick else dict(seqs=WINDOW_SEQS, step_max_seq=STEP_MAX_SEQ,
                                                 train_iters=TRAIN_ITERS, repeats=5)
    seqs = args.seq or list(quick["seqs"])
    step_max = args.step_max_seq if args.step_max_seq is not None else quick["step_max_seq"]
    train_iters = args.train_iters if args.train_iters is not None else quick["train_iters"]
    repeats = args.repeats if args.repeats is not None else quick["repeats"]
    for flag, value, ok in (("--seq", seqs, min(seqs) >= 1),
                            ("--windows", args.windows, min(args.windows) >= 1),
                            ("--loss-windows", args.loss_windows, min(args.loss_windows) >= 1),
                            ("--step-max-seq", step_max, step_max >= 0),
                            ("--block-size", args.block_size, args.block_size >= 1),
                            ("--batch-size", args.batch_size, args.batch_size >= 1),
                            ("--threads", args.threads, args.threads is None or args.threads >= 1),
                            ("--train-iters", train_iters, train_iters >= 0),
                            ("--warmup", args.warmup, args.warmup >= 0),
                            ("--repeats", repeats, repeats >= 1)):
        if not ok:
            least = 0 if flag in ("--step-max-seq", "--train-iters", "--warmup") else 1
            p.error(f"argument {flag}: every value must be >= {least}, got {value}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: CUDA is not available on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = TrainConfig.from_dict(default_settings()).model
    dtype = torch.float32
    windows = sorted(set(args.windows))
    backend = "ext"
    why = unavailable_reason("ext", device, dtype, model.head_dim, True, ("window",))
    if why is not None:
        backend = "sdpa"
        print(f"note: our kernels are not available ({why}); timing 'sdpa' instead, which "
              f"applies the window as a mask over the whole score matrix, so a window saves "
              f"no time there")
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    print(f"device {device} ({where}), torch {torch.__version__}, backend {backend}")
    setup = dict(device=where, torch=torch.__version__, backend=backend, dtype="float32",
                 n_head=model.n_head, head_dim=model.head_dim, windows=windows, seqs=seqs,
                 step_max_seq=step_max, warmup=args.warmup, repeats=repeats)
    results = dict(setup=setup)
    results["attention"] = attention_cost(seqs, windows, n_head=model.n_head,
                                          head_dim=model.head_dim, device=device, dtype=dtype,
                                          backend=backend, warmup=args.warmup, repeats=repeats)
    results["step"] = step_cost([T for T in seqs if T <= step_max], windows, device=device,
                                warmup=args.warmup, repeats=repeats)
    if train_iters:
        loss_windows = [None] + sorted(set(args.loss_windows))
        results["loss"] = dict(block_size=args.block_size, batch_size=args.batch_size,
                               max_iters=train_iters,
                               rows=window_losses(loss_windows, args.out, args.data,
                                                  block_size=args.block_size,
                                                  batch_size=args.batch_size,
                                                  max_iters=train_iters, device=args.device))
    from minigpt.analysis.pictures import plot_window_cost

    write_results(args.out, results, window_markdown(results), plot_window_cost, "window.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
