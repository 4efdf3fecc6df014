"""``python -m minigpt experiments window``: what a sliding window saves, and what it costs.

A sliding window (GPTConfig.window; Beltagy et al. 2020) lets each query see only the last W
keys. Cost: forward+backward of attention() alone at the default model's head shape (B 1,
n_head heads of head_dim), full causal against each window W, on the same inputs, for T up to
8192: median time and peak memory (minigpt.bench.profile's measurements), the variants timed in
turn at each T; and the time of one whole training step (minigpt.train.loop's gradients and
optimizer_step: forward, backward, clipping, optimizer) of the default model shape at
block_size T, batch 1. The compiled kernels skip key tiles outside the window, so the full
causal time grows as T^2 and the windowed one as T * W. Loss: the default model trained at
block_size 256 with full attention and with small windows, the same seed, batches and steps,
final validation loss. Writes results.md, results.json and window.png to --out.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from minigpt.train.config import TrainConfig, apply_overrides, default_settings
from minigpt.experiments.common import check_paths, train_run, write_results

HELP = "sliding-window attention: time and memory against T, training-step time, and the loss"

# Sequence lengths and windows of the cost measurement, the windows of the loss runs,
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
WINDOW_FULL = dict(seqs=WINDOW_SEQS, step_max_seq=STEP_MAX_SEQ, train_iters=TRAIN_ITERS,
                   repeats=5)


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
    """One training step of the default model and optimizer at block_size T, batch 1, on random
    tokens, in float32: minigpt.train.loop's gradients (forward, backward, gradient clipping)
    and optimizer_step. Full and each window, the same initial weights, timed in turn (median
    ms). One row per (T, variant): T, variant, window, ms, ms_vs_full."""
    import torch

    from minigpt.model import GPT
    from minigpt.runtime import resolve_precision
    from minigpt.train.loop import gradients, optimizer_step
    from minigpt.train.optim import build_optimizer

    device = torch.device(device)
    precision = resolve_precision("float32", device)

    def train_step(model, optimizer, scaler, batch, grad_clip):
        gradients(model, [batch], optimizer, scaler, autocast=precision.autocast,
                  grad_clip=grad_clip)
        optimizer_step(optimizer, scaler)

    rows = []
    for T in seqs:
        variants = [None] + [W for W in windows if W < T]
        fns = {}
        for W in variants:
            cfg = TrainConfig.from_dict(apply_overrides(
                default_settings(), {"model": {"block_size": T, "window": W}}))
            torch.manual_seed(cfg.seed)
            model = GPT(cfg.model).to(device)
            optimizer = build_optimizer(model, cfg, device.type)
            g = torch.Generator().manual_seed(T)
            tokens = torch.randint(0, cfg.model.vocab_size, (1, T + 1), generator=g).to(device)
            fns[variant_name(W)] = partial(train_step, model, optimizer, precision.grad_scaler(),
                                           (tokens[:, :-1], tokens[:, 1:]), cfg.grad_clip)
        times = _time_in_turn(fns, device, warmup, repeats)
        case = [dict(T=T, variant=variant_name(W), window=W,
                     ms=round(times[variant_name(W)] * 1e3, 3)) for W in variants]
        rows += _with_ratios(case, ("ms",))
        log(f"training step T={T}: " + ", ".join(f"{r['variant']} {r['ms']:.1f} ms"
                                                 for r in case))
    return rows


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
        result = train_run(cfg)
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


def add_arguments(p: argparse.ArgumentParser, quick: bool = False) -> None:
    """The flags of ``experiments window``; quick: the defaults that --quick gives."""
    d = WINDOW_QUICK if quick else WINDOW_FULL
    p.add_argument("--seq", type=int, nargs="+", default=list(d["seqs"]),
                   help=f"sequence lengths T of the attention measurement (with --quick: "
                        f"{' '.join(map(str, WINDOW_QUICK['seqs']))})")
    p.add_argument("--windows", type=int, nargs="+", default=list(WINDOW_SIZES),
                   help="windows W compared with full causal attention; a W >= T is skipped "
                        "at that T")
    p.add_argument("--step-max-seq", type=int, default=d["step_max_seq"],
                   help=f"time the training step at the T values up to this (0: none; "
                        f"{WINDOW_QUICK['step_max_seq']} with --quick)")
    p.add_argument("--loss-windows", type=int, nargs="+", default=list(LOSS_WINDOWS),
                   help="windows of the loss runs, each against full attention")
    p.add_argument("--block-size", type=int, default=LOSS_BLOCK_SIZE,
                   help="training context of the loss runs")
    p.add_argument("--batch-size", type=int, default=LOSS_BATCH_SIZE,
                   help="sequences per step of the loss runs")
    p.add_argument("--train-iters", type=int, default=d["train_iters"],
                   help=f"training steps of each loss run (0: no loss runs; "
                        f"{WINDOW_QUICK['train_iters']} with --quick)")
    p.add_argument("--device", default="cpu", help="device of every measurement")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for every measurement; None: torch's")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each variant")
    p.add_argument("--repeats", type=int, default=d["repeats"],
                   help=f"timed runs of each variant, median reported "
                        f"({WINDOW_QUICK['repeats']} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="shorter sequences, fewer repeats and training steps: under a minute "
                        "on 2 CPU cores")
    p.add_argument("--data", default=None, help="UTF-8 text file; None: tiny Shakespeare")
    p.add_argument("--out", "--out-dir", dest="out", default="runs/window",
                   help="results.md, results.json and window.png go here, and the loss runs' "
                        "directories")


def run(p: argparse.ArgumentParser, args) -> int:
    """Check the paths and numbers, measure the cost and the loss, write the results."""
    import torch

    from minigpt.attention import unavailable_reason

    check_paths(p, args.data, args.out, "--out")
    seqs, step_max, train_iters, repeats = (args.seq, args.step_max_seq, args.train_iters,
                                            args.repeats)
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
    from minigpt.analysis.curves import plot_window_cost

    write_results(args.out, results, window_markdown(results), plot_window_cost, "window.png")
    return 0
