"""Head importance: how much the loss rises when one attention head is removed.

Each head's output is multiplied by a gate before the layer's output projection c_proj
(GPT.gated_heads, the gates xi_h of Michel et al. 2019); a gate of 0 removes the head. The loss
on a fixed set of batches is measured with every head on, then with each head masked alone; the
difference is that head's importance. This is the single-head ablation of Michel et al. 2019,
"Are Sixteen Heads Really Better than One?" (NeurIPS 2019; removing one head at test time, they
find most heads can go with little loss), on our small model. Voita et al. 2019, "Analyzing
Multi-Head Self-Attention: Specialized Heads Do the Heavy Lifting, the Rest Can Be Pruned" (ACL
2019), reach the same picture with other measures: a few heads matter, most are redundant.

Losses are mean cross-entropies in nats/token (minigpt.train.loop.mean_loss). Head grids are
(n_layer, n_head) tensors indexed [layer, head]; a pruned layer (GPTConfig.layer_heads) has
only its first heads. The command line is `python -m minigpt heads` (minigpt.analysis.heads).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch

from minigpt.model import GPT
from minigpt.train.loop import mean_loss


def parse_mask(specs: Sequence[str], n_layer: int, n_head: int,
               layer_heads: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Heads given as "L:H" strings (negative L counts from the end) -> (n_layer, n_head) float32
    gates, 0 for the listed heads and 1 elsewhere.

    Args:
        specs: e.g. ["3:1", "-1:0"]. n_layer, n_head: the model's shape.
        layer_heads: each layer's head count when they differ (a pruned model,
            GPTConfig.layer_heads); None = n_head everywhere.

    Raises:
        ValueError: a spec is not L:H or names a layer or head out of range.
    """
    gates = torch.ones(n_layer, n_head)
    for spec in specs:
        try:
            layer, head = (int(part) for part in spec.split(":"))
        except ValueError:
            raise ValueError(f"--mask {spec!r}: expected LAYER:HEAD, e.g. 0:1") from None
        if not -n_layer <= layer < n_layer or not 0 <= head < n_head:
            raise ValueError(f"--mask {spec}: out of range for {n_layer} layers x {n_head} heads")
        if layer_heads is not None and head >= layer_heads[layer % n_layer]:
            raise ValueError(f"--mask {spec}: layer {layer % n_layer} has "
                             f"{layer_heads[layer % n_layer]} heads (pruned)")
        gates[layer % n_layer, head] = 0.0
    return gates


def present_heads(cfg) -> torch.Tensor:
    """(n_layer, n_head) bool: True where layer l has head h, i.e. h < its head count (all True
    unless GPTConfig.layer_heads is set, as in a pruned model). cfg: a GPTConfig."""
    counts = torch.tensor([cfg.heads(layer)[0] for layer in range(cfg.n_layer)])
    return torch.arange(cfg.n_head)[None, :] < counts[:, None]


@torch.no_grad()
def evaluate_loss(model: GPT, batches, head_mask: Optional[torch.Tensor] = None) -> float:
    """Mean cross-entropy (nats/token) of model over batches [(x, y), ...] of int64 (B, T)
    tensors (minigpt.train.loop.mean_loss, in eval mode), with the (n_layer, n_head) head_mask
    gates on the model's device (None: all heads on)."""
    gates = model.gated_heads(head_mask) if head_mask is not None else contextlib.nullcontext()
    with gates:
        return mean_loss(model, batches).item()


def head_importance(model: GPT, batches, base_mask: Optional[torch.Tensor] = None,
                    progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Loss with each head masked alone (Michel et al. 2019), on fixed batches.

    Args:
        model: a GPT. batches: list of (x, y) int64 (B, T) pairs on the model's device.
        base_mask: (n_layer, n_head) gates applied in every measurement (heads masked by hand),
            or None (all ones).
        progress: optional callable(done, total) after each measurement.

    Returns:
        {"base_loss": float, "loss": (n_layer, n_head) float64 tensor, "increase": loss -
        base_loss, "masked": (n_layer, n_head) bool, the heads base_mask already removes
        and those a pruned layer lacks (their loss and increase are NaN)}. Losses in
        nats/token; n_layer * n_head + 1 evaluations of the batches at most.
    """
    cfg = model.config
    device = next(model.parameters()).device
    base = torch.ones(cfg.n_layer, cfg.n_head) if base_mask is None else base_mask.float().cpu()
    base = base * present_heads(cfg)  # a pruned layer's missing heads count as masked
    masked = base == 0
    base_loss = evaluate_loss(model, batches, base.to(device))
    loss = torch.full((cfg.n_layer, cfg.n_head), float("nan"), dtype=torch.float64)
    todo = [(l, h) for l in range(cfg.n_layer) for h in range(cfg.n_head) if not masked[l, h]]
    for n, (layer, head) in enumerate(todo):
        gates = base.clone()
        gates[layer, head] = 0.0
        loss[layer, head] = evaluate_loss(model, batches, gates.to(device))
        if progress is not None:
            progress(n + 1, len(todo))
    return {"base_loss": base_loss, "loss": loss, "increase": loss - base_loss, "masked": masked}


def format_grid(increase: torch.Tensor, masked: torch.Tensor) -> str:
    """The layers x heads grid of loss increases (n_layer, n_head) as text, one row per layer,
    "masked" where masked (n_layer, n_head) bool is True."""
    L, H = increase.shape
    lines = ["         " + "".join(f"{'head ' + str(h):>9}" for h in range(H))]
    for layer in range(L):
        cells = ["masked" if masked[layer, h] else f"{increase[layer, h].item():+.4f}"
                 for h in range(H)]
        lines.append(f"layer {layer:<3}" + "".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """One row per measured head of a head_importance result: rank, layer, head, loss with the
    head masked, increase; the most important (largest increase) first."""
    loss, inc, masked = result["loss"], result["increase"], result["masked"]
    rows = [(inc[l, h].item(), l, h) for l in range(inc.shape[0]) for h in range(inc.shape[1])
            if not masked[l, h]]
    rows.sort(key=lambda r: -r[0])
    lines = [f"{'rank':>4} {'layer':>5} {'head':>4} {'val loss':>9} {'increase':>9}"]
    for rank, (value, layer, head) in enumerate(rows, 1):
        lines.append(f"{rank:>4} {layer:>5} {head:>4} {loss[layer, head].item():>9.4f} "
                     f"{value:>+9.4f}")
    return "\n".join(lines)
