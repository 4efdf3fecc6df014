"""Pictures of a model: attention heatmaps, head importance, and training curves.

- draw_attention / plot_attention: one heatmap per head of one layer, rows = queries, columns
  = keys, axis labels = the decoded tokens with whitespace made visible. The probabilities come
  from GPT.attention_maps, i.e. the explicit softmax(QK^T / sqrt(d)) path (Vaswani et al.
  2017, eq. 1) of the same weights: the fused kernels never store probabilities.
- plot_head_importance: the layers x heads grid of loss increases from minigpt.analysis.heads
  (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"); plot_prune_curve: the
  val loss against the number of heads removed by minigpt.analysis.heads --prune.
- read_metrics / plot_curves / plot_metrics_file: train/val loss and learning rate against
  iterations from a training run's metrics.jsonl (see `python -m minigpt plot`).
- plot_extrapolation: validation loss against evaluation length, one line per position
  encoding (`python -m minigpt experiments positions`).
- plot_window_cost: attention time and memory, and training-step time, against sequence length,
  full causal against sliding windows (`python -m minigpt experiments window`).

Figures are built with matplotlib's object API (matplotlib.figure.Figure, saved through the Agg
canvas): no display, no pyplot state, and the caller's backend is left alone.
"""

from __future__ import annotations

import functools
import json
import math
from functools import partial
from pathlib import Path
from typing import List, Optional, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib import colors
from matplotlib.figure import Figure

from minigpt.train.config import TrainConfig, lr_at

# Whitespace and control characters drawn as visible symbols (all in matplotlib's DejaVu fonts).
_VISIBLE = {"\n": "⏎", " ": "␣", "\t": "⇥", "\r": "\\r"}
LABEL_FONT = "DejaVu Sans Mono"  # ships with matplotlib
MAX_LABEL_CHARS = 12
# Default --max-tokens: about what keeps one label per row readable at 7 pt.
DEFAULT_MAX_TOKENS = {"char": 64, "gpt2": 48}
_PROMPT_COLOR, _GENERATED_COLOR = "black", "tab:blue"


@functools.lru_cache(maxsize=1)
def _font_chars() -> frozenset:
    """The code points LABEL_FONT can draw (others would be empty boxes)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(font_manager.findfont(LABEL_FONT)).get_charmap())


def _visible(c: str) -> str:
    if c in _VISIBLE:
        return _VISIBLE[c]
    if not c.isprintable():
        return f"\\x{ord(c):02x}" if ord(c) < 256 else f"U+{ord(c):04X}"
    return c if ord(c) in _font_chars() else f"U+{ord(c):04X}"


def display_token(s: str, max_chars: int = MAX_LABEL_CHARS) -> str:
    """A token's text as a plot label: "\\n" -> "⏎", " " -> "␣", "\\t" -> "⇥", other control
    characters as \\xNN escapes, characters the label font lacks (emoji) as U+XXXX, cut to
    max_chars characters (ending in "…").

    >>> display_token(" the\\n")
    '␣the⏎'
    """
    out = "".join(_visible(c) for c in s)
    if not out:
        out = "∅"
    if len(out) > max_chars:
        out = out[:max_chars - 1] + "…"
    return out


def token_labels(tokenizer, ids: Sequence[int]) -> List[str]:
    """One readable label per token id: tokenizer.token_strings with whitespace made visible.

    A GPT-2 token can be part of a multi-byte UTF-8 character; its bytes are then shown as
    \\xNN escapes instead of the replacement character.
    """
    ids = [int(i) for i in ids]
    labels = []
    for i, s in zip(ids, tokenizer.token_strings(ids)):
        if "\ufffd" in s:
            s = tokenizer.decode_bytes([i]).decode("utf-8", errors="backslashreplace")
        labels.append(display_token(s))
    return labels


def default_max_tokens(tokenizer) -> int:
    """64 tokens for the char tokenizer, 48 for GPT-2 BPE (longer labels)."""
    return DEFAULT_MAX_TOKENS.get(getattr(tokenizer, "name", ""), 48)


def image_path_error(path) -> Optional[str]:
    """Why an image cannot be saved to path (no such directory, unknown suffix), or None."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    if not path.resolve().parent.is_dir():
        return f"no such directory {path.resolve().parent}"
    kinds = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in kinds:
        return (f"the file name must end in an image type "
                f"({', '.join('.' + k for k in sorted(kinds))}), got {path}")
    return None


def _grid(n: int):
    """(rows, cols) of a near-square grid holding n panels, wider than tall."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def plot_attention(maps, labels: Sequence[str], path, *, layer: int, heads: Sequence[int],
                   n_prompt: int = 0, title: Optional[str] = None, dpi: int = 110) -> Path:
    """Draw one heatmap per head and save a PNG.

    Args:
        maps: (len(heads), T, T) attention probabilities (tensor or array), rows = queries,
            columns = keys; entries above the diagonal (future keys) are drawn hatched grey.
        labels: T token labels (see token_labels), on both axes.
        path: output file; the format follows the suffix (.png, .pdf, .svg).
        layer: the layer index, for the titles. heads: the head index of each map.
        n_prompt: how many of the T tokens are prompt; their labels are black, the rest
            (generated) blue.
        title: the figure's title; a default names the layer and the axes.

    Returns:
        path as a Path. One shared colour bar, probability 0 to 1 on a linear scale.

    Raises:
        ValueError: maps is not (len(heads), T, T) with T == len(labels).
    """
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().cpu().double().numpy()
    maps = np.asarray(maps, dtype=np.float64)
    T = len(labels)
    if maps.ndim != 3 or maps.shape != (len(heads), T, T):
        raise ValueError(f"plot_attention: maps must be (len(heads)={len(heads)}, T={T}, T), "
                         f"got shape {maps.shape}")
    rows, cols = _grid(len(heads))
    # About 0.15 inch per token keeps 8 pt labels apart; never smaller than 3 inches a panel.
    panel = max(3.0, 0.15 * T + 1.2)
    fig = Figure(figsize=(cols * panel + 1.2, rows * panel + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    # Masked (future) cells are transparent and show the hatched grey background.
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=(0, 0, 0, 0))
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    # Single characters read best upright; longer (BPE) labels need the room of a vertical line.
    single = max(len(s) for s in labels) <= 1
    x_rotation = 0 if single else 90
    fontsize = 10 if T <= 24 else 9 if single else 8
    ticks = np.arange(T)
    label_colors = [_PROMPT_COLOR if i < n_prompt else _GENERATED_COLOR for i in range(T)]
    image = None
    for n, ax in enumerate(axes.flat):
        if n >= len(heads):
            ax.set_visible(False)
            continue
        ax.set_facecolor("#eeeeee")
        ax.patch.set_hatch("///")
        ax.patch.set_edgecolor("#bbbbbb")
        image = ax.imshow(np.ma.masked_array(maps[n], mask=future), cmap=cmap, vmin=0.0, vmax=1.0,
                          interpolation="nearest", aspect="equal")
        ax.set_title(f"layer {layer}, head {heads[n]}", fontsize=11)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xticklabels(labels, rotation=x_rotation, fontsize=fontsize, family=LABEL_FONT,
                           parse_math=False)
        ax.set_yticklabels(labels, fontsize=fontsize, family=LABEL_FONT, parse_math=False)
        for tick_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            for text, color in zip(tick_labels, label_colors):
                text.set_color(color)
        ax.tick_params(length=2, pad=1)
        ax.set_xlabel("key (attended-to token)", fontsize=9)
        ax.set_ylabel("query (attending token)", fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attention probability")
    if title is None:
        title = f"Attention of layer {layer}: rows = queries, columns = keys"
    legend = ("probabilities from the explicit softmax path (GPT.attention_maps); each row sums "
              "to 1; hatched = future keys (causal mask)"
              + ("; labels: prompt black, generated blue" if 0 < n_prompt < T else ""))
    fig.suptitle(f"{title}\n{legend}", fontsize=12)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def draw_attention(model, tokenizer, ids: Sequence[int], path, *, layer: int = -1,
                   heads: Optional[Sequence[int]] = None, max_tokens: Optional[int] = None,
                   n_prompt: int = 0, title_prefix: str = "") -> dict:
    """Attention heatmaps of one layer for a token sequence (e.g. prompt + generated text).

    The map covers the last min(max_tokens, block_size, len(ids)) tokens, fed to the model as
    their own context, so every drawn row is a complete distribution (sums to 1).

    Args:
        model: a GPT (its device is used). tokenizer: gives the labels (token_labels).
        ids: the token ids, prompt first. n_prompt: how many of ids are the prompt.
        layer: layer index, negative counts from the end (default -1, the last layer).
        heads: head indices (default all heads).
        max_tokens: cap on the sequence drawn (default default_max_tokens(tokenizer)).

    Returns:
        {"path", "layer", "heads", "tokens" (drawn), "total" (len(ids)), "maps"
        (len(heads), T, T) float32 tensor on the CPU}.

    Raises:
        ValueError: a layer or head out of range, empty ids, or max_tokens < 1.
    """
    cfg = model.config
    if not -cfg.n_layer <= layer < cfg.n_layer:
        raise ValueError(f"layer {layer} is out of range for a model with {cfg.n_layer} layers "
                         f"(0..{cfg.n_layer - 1}, or negative from the end)")
    layer %= cfg.n_layer
    n_head = cfg.heads(layer)[0]  # fewer than cfg.n_head in a pruned layer
    heads = list(range(n_head)) if not heads else [int(h) for h in heads]
    for h in heads:
        if not 0 <= h < n_head:
            raise ValueError(f"head {h} is out of range for a model with {n_head} heads "
                             f"(0..{n_head - 1})" + (f" in layer {layer}" if n_head != cfg.n_head
                                                     else ""))
    max_tokens = default_max_tokens(tokenizer) if max_tokens is None else max_tokens
    if max_tokens < 1 or len(ids) == 0:
        raise ValueError(f"draw_attention: need max_tokens >= 1 and at least one token, got "
                         f"max_tokens={max_tokens}, {len(ids)} tokens")
    ids = [int(i) for i in ids]
    T = min(max_tokens, cfg.block_size, len(ids))
    window = ids[-T:]
    start = len(ids) - T
    device = next(model.parameters()).device
    maps = model.attention_maps(torch.tensor(window, dtype=torch.long, device=device))
    maps = maps[layer, heads].cpu()  # (len(heads), T, T)
    shown = (f"all {T} tokens" if T == len(ids)
             else f"last {T} of {len(ids)} tokens (--max-tokens {max_tokens}, "
                  f"block_size {cfg.block_size})")
    title = (f"{title_prefix}Attention of layer {layer} (of 0..{cfg.n_layer - 1}), "
             f"{shown}; rows = queries, columns = keys")
    plot_attention(maps, token_labels(tokenizer, window), path, layer=layer, heads=heads,
                   n_prompt=max(0, n_prompt - start), title=title)
    return {"path": Path(path), "layer": layer, "heads": heads, "tokens": T, "total": len(ids),
            "maps": maps}


def plot_head_importance(increase, path, *, base_loss: float, masked=None,
                         title: Optional[str] = None, dpi: int = 110) -> Path:
    """Heatmap of layers x heads: the loss increase when each head alone is masked.

    Args:
        increase: (n_layer, n_head) loss increases in nats/token (NaN for heads that were
            masked beforehand, drawn grey and marked "masked").
        path: output file (.png). base_loss: the loss with no extra head masked, for the title.
        masked: (n_layer, n_head) bool, heads masked by hand before the measurement.

    Colours: diverging around 0 (red = the loss rises without the head, blue = it falls), with
    the value written in each cell.
    """
    inc = np.asarray(increase.cpu() if isinstance(increase, torch.Tensor) else increase,
                     dtype=np.float64)
    L, H = inc.shape
    masked = np.zeros_like(inc, dtype=bool) if masked is None else np.asarray(masked, dtype=bool)
    finite = inc[np.isfinite(inc)]
    hi = max(float(finite.max()) if finite.size else 0.0, 1e-6)
    lo = min(float(finite.min()) if finite.size else 0.0, -1e-6)
    bound = max(hi, -lo)
    norm = colors.TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)
    fig = Figure(figsize=(1.1 * H + 2.6, 0.8 * L + 1.8), layout="constrained")
    ax = fig.subplots()
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#bbbbbb")
    image = ax.imshow(np.ma.masked_invalid(inc), cmap=cmap, norm=norm, aspect="auto",
                      interpolation="nearest")
    # Enough decimals for two significant digits of the largest |increase|.
    digits = max(3, 1 - math.floor(math.log10(bound)))
    for layer in range(L):
        for head in range(H):
            value = inc[layer, head]
            if masked[layer, head] or not math.isfinite(value):
                text, color = "masked", "black"
            else:
                text = f"{value:+.{digits}f}"
                color = "white" if abs(value) > 0.6 * bound else "black"
            ax.text(head, layer, text, ha="center", va="center", fontsize=9, color=color)
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="val loss increase (nats/token)")
    ax.set_title(title or f"Loss increase when one head is masked (base loss {base_loss:.4f})",
                 fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def plot_prune_curve(removed: Sequence[int], losses: Sequence[float], path, *,
                     finetuned: Optional[float] = None, labels: Optional[Sequence[str]] = None,
                     title: Optional[str] = None, dpi: int = 110) -> Path:
    """Validation loss against the number of attention heads removed by greedy pruning
    (minigpt.analysis.heads --prune; Michel et al. 2019 draw such curves for their models).

    Args:
        removed: heads removed so far at each point, starting at 0. losses: the loss at each.
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

    Keeps rows with train_loss and val_loss (skips other events and a torn last line). A log
    holding several runs (iter going back, e.g. a fresh run in the same out_dir) is split at
    each restart; a resumed run repeats its first iter, and the later row wins.

    Returns:
        {"rows": the last run's rows, sorted by iter, "runs": how many runs the log holds}.

    Raises:
        FileNotFoundError: no such file. ValueError: no evaluation rows in it.
    """
    path = Path(path)
    runs: list = [[]]
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or row.get("event", "eval") != "eval":
            continue
        if not all(isinstance(row.get(k), (int, float)) for k in ("iter", "train_loss",
                                                                    "val_loss")):
            continue
        if runs[-1] and row["iter"] < runs[-1][-1]["iter"]:
            runs.append([])
        if runs[-1] and row["iter"] == runs[-1][-1]["iter"]:
            runs[-1][-1] = row
        else:
            runs[-1].append(row)
    if not runs[-1]:
        raise ValueError(f"{path}: no evaluation rows (lines with iter, train_loss, val_loss)")
    return {"rows": runs[-1], "runs": len(runs)}


def plot_curves(rows: Sequence[dict], path, *, title: Optional[str] = None, lr_fn=None,
                dpi: int = 110) -> Path:
    """Train/val loss (top) and learning rate (bottom) against iterations, saved to path.

    Args:
        rows: dicts with iter, train_loss, val_loss and optionally lr (metrics.jsonl rows).
        path: output file. title: default names the last iteration and val loss.
        lr_fn: optional callable(iter) -> learning rate, drawn at every iteration (the log
            holds the rate only at evaluations, too coarse to show a short warmup).
    """
    its = [r["iter"] for r in rows]
    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1.0))
    ax_loss.plot(its, [r["train_loss"] for r in rows], "o-", ms=3, label="train loss")
    ax_loss.plot(its, [r["val_loss"] for r in rows], "o-", ms=3, label="val loss")
    best = min(rows, key=lambda r: r["val_loss"])
    ax_loss.plot([best["iter"]], [best["val_loss"]], "*", ms=12, color="tab:red",
                 label=f"best val {best['val_loss']:.4f} (iter {best['iter']})")
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
    ax_loss.set_title(title or f"Training curves: {len(rows)} evaluations to iter {last['iter']}, "
                               f"final val {last['val_loss']:.4f}", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def plot_metrics_file(metrics, out: Optional[str] = None,
                      train_config: Optional[dict] = None) -> Path:
    """Read a metrics.jsonl (or the directory holding it) and plot it to out (default:
    curves.png beside the log). Returns the PNG's path. Raises as read_metrics.

    train_config (a TrainConfig as a dict, TrainConfig.to_dict) draws the learning-rate schedule at every iteration;
    without it, the one stored in a ckpt.pt beside the log is used if there is one.
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
    return plot_curves(log["rows"], out, title=title, lr_fn=lr_fn)


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
