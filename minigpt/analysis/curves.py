"""Line plots of runs and experiments: training curves, and the figures of head pruning and of
the position and window experiments.

- read_metrics / plot_curves / plot_metrics_file: train/val loss (cross-entropy, nats/token) and
  learning rate against iterations from a training run's metrics.jsonl (train.py draws the
  picture when it finishes; `python -m minigpt plot RUN [--out FILE]` draws it again: main()
  below, exit codes 0 done, 2 bad input such as no log or no evaluation rows).
- plot_prune_curve: val loss against the number of heads removed by greedy pruning (`python -m
  minigpt heads --prune`; Michel et al. 2019, "Are Sixteen Heads Really Better than One?",
  draw such curves for their models).
- plot_extrapolation: validation loss against evaluation length, one line per position
  encoding (`python -m minigpt experiments positions`).
- plot_window_cost: attention time and memory, and training-step time, against sequence length,
  full causal against sliding windows (`python -m minigpt experiments window`).

Figures are built with matplotlib's object API (matplotlib.figure.Figure, saved through the Agg
canvas): no display, no pyplot state, and the caller's backend is left alone. Every function
saves to `path` (the format follows its suffix) and returns it as a Path.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from minigpt.runtime import ArgumentParser, cli_main
from minigpt.train.config import TrainConfig, lr_at


def plot_prune_curve(removed: Sequence[int], losses: Sequence[float], path, *,
                     finetuned: Optional[float] = None, labels: Optional[Sequence[str]] = None,
                     title: Optional[str] = None, dpi: int = 110) -> Path:
    """Validation loss against the number of attention heads removed by greedy pruning
    (minigpt.analysis.prune.greedy_prune, `python -m minigpt heads --prune`).

    Args:
        removed: heads removed so far at each point, starting at 0. losses: the loss at each
            (nats/token), as long as removed.
        path: output file (.png). finetuned: the loss after fine-tuning the final model, drawn
            as a star at the last point (None: not drawn). labels: optional text per point
            after the first (the heads removed at that step, e.g. "L2H1").
    """
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(removed, losses, "o-", ms=4, color="tab:blue", label="pruned (greedy, no training)")
    for x, y, text in zip(removed[1:], losses[1:], labels or []):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=7)
    if finetuned is not None:
        ax.plot([removed[-1]], [finetuned], "*", ms=12, color="tab:red",
                label=f"after fine-tuning: {finetuned:.4f}")
    ax.set_xlabel("attention heads removed")
    ax.set_ylabel("val loss (nats/token)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or f"Val loss as heads are pruned: {losses[0]:.4f} -> {losses[-1]:.4f}",
                 fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def read_metrics(path) -> dict:
    """The evaluation rows of a metrics.jsonl written by minigpt.train.loop.

    Keeps rows with train_loss and val_loss (skips other events and a torn last line), and the
    "whole_split" row that ends a completed run (its val_loss over the whole validation split).
    A log holding several runs (iter going back, e.g. a fresh run in the same out_dir) is split
    at each restart; a resumed run repeats its first iter, and the later row wins.

    Returns:
        {"rows": the last run's rows, sorted by iter, "runs": how many runs the log holds,
        "whole_split": the last run's whole-split row at its last iter, or None}.

    Raises:
        FileNotFoundError: no such file. ValueError: no evaluation rows in it.
    """
    path = Path(path)
    runs: list = [[]]
    whole = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        numbers = {k for k in ("iter", "train_loss", "val_loss")
                   if isinstance(row.get(k), (int, float))}
        if row.get("event") == "whole_split" and {"iter", "val_loss"} <= numbers:
            whole = row
            continue
        if row.get("event", "eval") != "eval" or len(numbers) < 3:
            continue
        if runs[-1] and row["iter"] < runs[-1][-1]["iter"]:
            runs.append([])
        if runs[-1] and row["iter"] == runs[-1][-1]["iter"]:
            runs[-1][-1] = row
        else:
            runs[-1].append(row)
    if not runs[-1]:
        raise ValueError(f"{path}: no evaluation rows (lines with iter, train_loss, val_loss)")
    if whole is not None and whole["iter"] != runs[-1][-1]["iter"]:
        whole = None  # an earlier run's, or one the last run's evaluations went past
    return {"rows": runs[-1], "runs": len(runs), "whole_split": whole}


def plot_curves(rows: Sequence[dict], path, *, title: Optional[str] = None, lr_fn=None,
                dpi: int = 110, whole_split: Optional[dict] = None) -> Path:
    """Train/val loss (top) and learning rate (bottom) against iterations, saved to path.

    Args:
        rows: dicts with iter, train_loss, val_loss and optionally lr (metrics.jsonl rows).
        path: output file. title: default names the last iteration and val loss.
        lr_fn: optional callable(iter) -> learning rate, drawn at every iteration (the log
            holds the rate only at evaluations, too coarse to show a short warmup).
        whole_split: the run's final "whole_split" row (iter, val_loss), drawn as its own
            point beside the sampled val loss, or None.
    """
    its = [r["iter"] for r in rows]
    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1.0))
    ax_loss.plot(its, [r["train_loss"] for r in rows], "o-", ms=3, label="train loss")
    ax_loss.plot(its, [r["val_loss"] for r in rows], "o-", ms=3, label="val loss")
    best = min(rows, key=lambda r: r["val_loss"])
    ax_loss.plot([best["iter"]], [best["val_loss"]], "*", ms=12, color="tab:red",
                 label=f"best val {best['val_loss']:.4f} (iter {best['iter']})")
    if whole_split is not None:
        ax_loss.plot([whole_split["iter"]], [whole_split["val_loss"]], "D", ms=6,
                     color="black", label=f"val over the whole split {whole_split['val_loss']:.4f}")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    if lr_fn is not None:
        every = range(its[0], its[-1] + 1)
        ax_lr.plot(every, [lr_fn(it) for it in every], "-", color="tab:green",
                   label="schedule")
    lr_rows = [r for r in rows if isinstance(r.get("lr"), (int, float))]
    if lr_rows:
        ax_lr.plot([r["iter"] for r in lr_rows], [r["lr"] for r in lr_rows],
                   "." if lr_fn is not None else ".-", color="tab:green",
                   label="at evaluations")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration (optimizer step)")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.grid(alpha=0.3)
    last = rows[-1]
    final = (f"final val {last['val_loss']:.4f}" if whole_split is None else
             f"final val {whole_split['val_loss']:.4f} (whole split), "
             f"{last['val_loss']:.4f} (sample)")
    ax_loss.set_title(title or f"Training curves: {len(rows)} evaluations to iter {last['iter']}, "
                               f"{final}", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def plot_metrics_file(metrics, out: Optional[str] = None,
                      train_config: Optional[dict] = None) -> Path:
    """Read a metrics.jsonl (or the directory holding it) and plot it to out (default:
    curves.png beside the log). Returns the PNG's path. Raises as read_metrics.

    train_config (a TrainConfig as a dict, TrainConfig.to_dict) draws the learning-rate
    schedule at every iteration; without it, the one stored in a ckpt.pt beside the log is used
    if there is one.
    """
    metrics = Path(metrics)
    if metrics.is_dir():
        metrics = metrics / "metrics.jsonl"
    log = read_metrics(metrics)
    if train_config is None:
        train_config = _saved_train_config(metrics.with_name("ckpt.pt"))
    lr_fn = None
    if train_config is not None:
        lr_fn = partial(lr_at, cfg=TrainConfig.from_saved(train_config))
    out = Path(out) if out is not None else metrics.with_name("curves.png")
    title = None
    if log["runs"] > 1:
        last = log["rows"][-1]
        title = (f"Training curves (last of {log['runs']} runs in {metrics.name}): to iter "
                 f"{last['iter']}, final val {last['val_loss']:.4f}")
    return plot_curves(log["rows"], out, title=title, lr_fn=lr_fn, whole_split=log["whole_split"])


def _saved_train_config(ckpt: Path) -> Optional[dict]:
    from minigpt.checkpoint import CheckpointError, load_checkpoint

    if not ckpt.is_file():
        return None
    try:
        return load_checkpoint(ckpt).get("train_config")
    except CheckpointError:
        return None


def plot_extrapolation(results: dict, path, dpi: int = 110) -> Path:
    """Validation loss against evaluation length (log2 axis), one line per position encoding,
    with the training context marked; saved to path.

    Args:
        results: as minigpt.experiments.positions returns it: "block_size", "lengths",
            "eval_tokens" and "rows" of {"name", "val_loss": {str(length): loss}}.
    """
    lengths, bs = results["lengths"], results["block_size"]
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.subplots()
    for r in results["rows"]:
        ax.plot(lengths, [r["val_loss"][str(L)] for L in lengths], "o-", ms=4, label=r["name"])
    ax.axvline(bs, color="gray", ls="--", lw=1, label=f"training context ({bs})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{L}\n({L // bs}x)" for L in lengths])
    ax.minorticks_off()
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(f"Length extrapolation: trained at {bs} tokens, "
                 f"{results['eval_tokens']:,} val tokens per length", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def plot_window_cost(results: dict, path, dpi: int = 110) -> Path:
    """Full causal against sliding-window attention on log-log axes, one line per variant:
    attention forward+backward time and peak memory against T, and (when measured) the time
    of one training step against T. On the attention time panel, light dotted lines mark the T^2
    and T slopes through the last points of the full line and of the widest window's. Saved to
    path.

    Args:
        results: as ``python -m minigpt experiments window`` writes it: "setup" (with
            "windows", "backend"), "attention" and "step" rows of {"T", "variant", "ms"}
            ("peak_mib" for attention).
    """
    panels = [("attention", "ms", "attention forward + backward", "ms (median)"),
              ("attention", "peak_mib", "attention forward + backward peak memory", "MiB")]
    if results.get("step"):
        panels.append(("step", "ms", "one training step (batch 1)", "ms (median)"))
    fig = Figure(figsize=(5.0 * len(panels), 4.3), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    names = ["full"] + [f"window {W}" for W in results["setup"]["windows"]]
    for ax, (part, key, title, ylabel) in zip(axes, panels):
        rows = results[part]
        for name in names:
            rs = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["T"])
            if rs:
                ax.plot([r["T"] for r in rs], [r[key] for r in rs], "o-", ms=4, label=name)
        if part == "attention" and key == "ms":
            for name, power, label in ((names[0], 2, "∝ T²"), (names[-1], 1, "∝ T")):
                rs = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["T"])
                if len(rs) < 2:
                    continue
                Ts = np.array([r["T"] for r in rs], dtype=float)
                ref = rs[-1][key] * (Ts / Ts[-1]) ** power
                ax.plot(Ts, ref, ":", color="gray", lw=1, alpha=0.7)
                ax.annotate(label, (Ts[0], ref[0]), color="gray", fontsize=8,
                            textcoords="offset points", xytext=(0, 4))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    s = results["setup"]
    fig.suptitle(f"Sliding-window attention: {s['n_head']} heads x {s['head_dim']}, "
                 f"{s['dtype']}, backend {s['backend']}, {s['device']}", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def build_parser() -> ArgumentParser:
    """The command line of `python -m minigpt plot` (--help shows each flag's default)."""
    parser = ArgumentParser(prog="python -m minigpt plot",
                            description="Plot loss and learning-rate curves from a training "
                                        "run's metrics.jsonl.")
    parser.add_argument("run", type=Path, help="an out_dir holding metrics.jsonl, or the file")
    parser.add_argument("--out", type=Path, default=None,
                        help="output image, its format from the suffix (.png, .pdf, .svg); "
                             "None = curves.png beside metrics.jsonl")
    return parser


@cli_main
def main(argv=None) -> int:
    """`python -m minigpt plot`: prints the picture's path; exit code 2 for bad input."""
    args = build_parser().parse_args(argv)
    try:
        path = plot_metrics_file(args.run, args.out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
