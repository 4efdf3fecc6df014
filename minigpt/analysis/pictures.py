"""Pictures of a model's attention: heatmaps of attention probabilities, and the grid of head
importance.

- draw_attention / plot_attention: one heatmap per head of one layer, rows = queries, columns
  = keys, axis labels = the decoded tokens with whitespace made visible. The probabilities come
  from GPT.attention_maps, i.e. the explicit softmax(QK^T / sqrt(d)) path (Vaswani et al.
  2017, eq. 1) of the same weights: the fused kernels never store probabilities.
- plot_head_importance: the layers x heads grid of loss increases (nats/token) from
  minigpt.analysis.importance (the single-head ablation of Michel et al. 2019, "Are Sixteen
  Heads Really Better than One?").
- token_labels / display_token: token text as axis labels; image_path_error: the check the
  command lines make on an output image before any work.

Training curves and the experiments' line plots are in minigpt.analysis.curves. Figures are
built with matplotlib's object API (matplotlib.figure.Figure, saved through the Agg canvas): no
display, no pyplot state, and the caller's backend is left alone.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import List, Optional, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib import colors
from matplotlib.figure import Figure

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
