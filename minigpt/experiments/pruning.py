"""``python -m minigpt experiments prune``: attention heads pruned from a pretrained model.

    python -m minigpt experiments prune --init-from model.gguf --data alice29.txt --out runs/prune

After Michel et al. 2019, "Are Sixteen Heads Really Better than One?" (NeurIPS 2019, sec. 4):
score every head once, remove heads in increasing order of the score (10%, 20%, ... of them),
and measure each pruned model. The score is the single-head ablation of
minigpt.analysis.importance (the rise of the loss when the head alone is gated to 0; Michel et
al. use its first-order estimate |xi_h dL/dxi_h|), measured once on a calibration split.
Grouped-query layers keep equal key/value groups (minigpt.analysis.prune.prune_units): the
order is greedy_prune's, with the loss of a set of removed heads estimated as the sum of their
single-head increases, so the ranking costs no evaluation beyond the ablation pass. The chosen
heads are cut out of the weights (prune_heads); each pruned model's perplexity is measured on a
held-out split the ranking never saw, and its forward tokens/s beside the unpruned model's
(forward_throughput, interleaved). Writes results.md, results.json and prune.png (perplexity and
speed against the share of heads removed) to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from minigpt.experiments.common import (check_paths, even_batches, load_pretrained,
                                        pretrained_arguments, text_tokens, write_results)

HELP = "prune 10-50 percent of a pretrained model's heads, in order of importance"
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)
CONTEXT, CALIBRATION_TOKENS, EVAL_TOKENS = 512, 1024, 8192  # tokens


def windows(tokens, context: int, rows: int = 4) -> list:
    """Consecutive windows of context tokens as (x, y) int64 batches: tokens[s : s + context]
    predict tokens[s + 1 : s + context + 1] for s = 0, context, ...; batches of the largest row
    count <= rows that divides the number of windows (equal batches, so the mean of batch means
    is the mean over tokens). tokens: 1-d integers, len(tokens) - 1 a multiple of context."""
    span = torch.as_tensor(tokens, dtype=torch.int64)
    n = (len(span) - 1) // context
    if n < 1 or (len(span) - 1) % context:
        raise ValueError(f"windows: len(tokens) - 1 = {len(span) - 1} is not a positive "
                         f"multiple of context {context}")
    return even_batches(span[:-1].view(n, context), span[1:].view(n, context), rows)


class _Replay(nn.Module):
    """Stands in for a block: returns the output that block gave on this batch, unpruned."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output

    def forward(self, x, *args, **kwargs):
        return self.output


@contextlib.contextmanager
def _replayed(model, outputs: List[torch.Tensor], upto: int):
    """Blocks 0..upto-1 of model replaced by the outputs recorded from them (outputs[i])."""
    blocks = model.transformer.h
    saved = [blocks[i] for i in range(upto)]
    for i in range(upto):
        blocks[i] = _Replay(outputs[i])
    try:
        yield model
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


@torch.no_grad()
def ablation_importance(model, batches,
                        progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """minigpt.analysis.importance.head_importance with every head on as the base, computed
    faster: a head masked in layer l leaves layers 0..l-1 unchanged, so their outputs are
    recorded once per batch and only layers l..n_layer-1 run again (about 0.6x the cost on
    SmolLM2-135M, whose output head costs a fifth of the forward).

    Args:
        model: a GPT (eval mode is used; the mode is restored). batches: [(x, y), ...] int64
            (B, T) on the model's device. progress: optional callable(done, total).

    Returns:
        head_importance's dict: "base_loss", "loss" and "increase" ((n_layer, n_head) float64,
        NaN for heads a pruned layer lacks), "masked"; losses in nats/token.
    """
    from minigpt.analysis.importance import present_heads

    cfg = model.config
    was_training = model.training
    model.eval()
    device = batches[0][0].device
    present = present_heads(cfg)
    recorded, base = [], 0.0
    for x, y in batches:
        outputs: List[torch.Tensor] = []
        handles = [block.register_forward_hook(lambda m, a, out: outputs.append(out))
                   for block in model.transformer.h]
        try:
            base += model(x, y)[1].item()
        finally:
            for handle in handles:
                handle.remove()
        recorded.append(outputs)
    loss = torch.full((cfg.n_layer, cfg.n_head), float("nan"), dtype=torch.float64)
    todo = [(l, h) for l in range(cfg.n_layer) for h in range(cfg.n_head) if present[l, h]]
    try:
        for n, (layer, head) in enumerate(todo):
            gates = present.float()
            gates[layer, head] = 0.0
            total = 0.0
            with model.gated_heads(gates.to(device)):  # hooks on the real blocks, then replay
                for (x, y), outputs in zip(batches, recorded):
                    with _replayed(model, outputs, layer):
                        total += model(x, y)[1].item()
            loss[layer, head] = total / len(batches)
            if progress is not None:
                progress(n + 1, len(todo))
    finally:
        model.train(was_training)
    base_loss = base / len(batches)
    return {"base_loss": base_loss, "loss": loss, "increase": loss - base_loss,
            "masked": ~present}


def one_shot_order(cfg, increase: torch.Tensor, n: int) -> List[tuple]:
    """The query heads to remove for n, from single-head increases alone: greedy_prune's
    GQA-aware steps (prune_units) with the loss of removed heads estimated as the sum of their
    increases (n_layer, n_head). Returns [(layer, head), ...]: n heads, or fewer where only
    units of one head per key/value group are left and they do not fit (greedy_prune stops).

    Raises:
        ValueError: n out of 0..max_prunable(cfg) (greedy_prune's message).
    """
    from minigpt.analysis.importance import present_heads
    from minigpt.analysis.prune import greedy_prune

    present = present_heads(cfg)
    inc = increase.double().nan_to_num(0.0)

    def estimate(gates: torch.Tensor) -> float:
        return float(inc[present & (gates == 0)].sum())

    steps = greedy_prune(cfg, n, estimate)["steps"]
    return [tuple(head) for step in steps for head in step["removed"]]


def total_heads(cfg) -> int:
    """Query heads of a model of GPTConfig cfg, all layers."""
    return sum(cfg.heads(layer)[0] for layer in range(cfg.n_layer))


def check_fractions(cfg, fractions: Sequence[float]) -> None:
    """Raises ValueError (naming --fractions) unless every fraction is in (0, 1) and removes at
    most max_prunable(cfg) heads (all but one a layer) of a model of GPTConfig cfg."""
    from minigpt.analysis.prune import max_prunable

    heads = total_heads(cfg)
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise ValueError(f"--fractions: each must be in (0, 1), got {f}")
        if round(f * heads) > max_prunable(cfg):
            raise ValueError(f"--fractions: {f} would remove {round(f * heads)} of {heads} "
                             f"heads; at most {max_prunable(cfg)} (all but one a layer)")


def prune_experiment(model, calibration, heldout, fractions: Sequence[float], timing_x,
                     timing_runs: int = 5, log=print) -> dict:
    """Rank the heads once on calibration, prune round(f * heads) of them for each f (and 0),
    measure each model's loss on heldout and its forward tokens/s on timing_x.

    Args:
        model: a GPT. calibration, heldout: [(x, y), ...] int64 (B, T) batches (windows()).
        fractions: shares of the query heads to remove, each in (0, 1).
        timing_x: (B, T) int64, the batch every model is timed on (interleaved, median of
            timing_runs passes after one warm-up pass).

    Returns:
        {"heads", "importance": {"base_loss", "increase" (n_layer x n_head lists)}, "seconds":
        {"ranking", "evaluation", "timing"}, "rows": [{"fraction", "target", "removed",
        "layer_heads", "params", "loss" (nats/token), "perplexity", "tokens_per_s", "speedup",
        "heads": [[layer, head], ...]}]}; the first row is the unpruned model (fraction 0).

    Raises:
        ValueError: a bad fraction (check_fractions).
    """
    from minigpt.analysis.prune import forward_throughput, prune_heads
    from minigpt.train.loop import mean_loss

    cfg = model.config
    heads = total_heads(cfg)
    check_fractions(cfg, fractions)
    t0 = time.perf_counter()
    imp = ablation_importance(model, calibration,
                              lambda d, t: log(f"ablation {d}/{t}") if d % 30 == 0 else None)
    seconds = {"ranking": time.perf_counter() - t0}
    t0 = time.perf_counter()
    rows, models = [], {}
    for f in (0.0, *fractions):
        removed = one_shot_order(cfg, imp["increase"], round(f * heads))
        pruned = prune_heads(model, removed) if removed else model
        loss = mean_loss(pruned, heldout).item()
        rows.append(dict(fraction=f, target=round(f * heads), removed=len(removed),
                         layer_heads=[pruned.config.heads(l)[0] for l in range(cfg.n_layer)],
                         params=pruned.num_params(), loss=loss, perplexity=math.exp(loss),
                         heads=sorted([int(l), int(h)] for l, h in removed)))
        models[f"{f:g}"] = pruned
        log(f"{len(removed)} heads removed: held-out loss {loss:.4f}, perplexity "
            f"{math.exp(loss):.2f}")
    seconds["evaluation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    speed = forward_throughput(models, timing_x, runs=timing_runs, warmup=1)
    seconds["timing"] = time.perf_counter() - t0
    for row in rows:
        row["tokens_per_s"] = speed[f"{row['fraction']:g}"]
        row["speedup"] = row["tokens_per_s"] / speed["0"]
    return {"heads": heads, "seconds": seconds, "rows": rows,
            "importance": {"base_loss": imp["base_loss"],
                           "increase": imp["increase"].tolist()}}


def markdown(results: dict) -> str:
    """results (prune_experiment's, with "source", "calibration_tokens", "eval_tokens" and
    "context" added) as a Markdown table, one row per pruning level."""
    s = results["seconds"]
    lines = [f"Head pruning of {results['source']}: {results['heads']} query heads ranked once "
             f"by single-head ablation on {results['calibration_tokens']:,} calibration tokens "
             f"({s['ranking']:.0f} s); perplexity on {results['eval_tokens']:,} held-out "
             f"tokens in windows of {results['context']}; forward tokens/s on one "
             f"{results['timing_shape']} batch, all models interleaved.", "",
             "| heads removed | share | heads per layer (min-max) | parameters | held-out loss "
             "| perplexity | forward tokens/s | speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        lh = r["layer_heads"]
        lines.append(f"| {r['removed']} | {r['removed'] / results['heads']:.0%} | "
                     f"{min(lh)}-{max(lh)} | {r['params']:,} | {r['loss']:.4f} | "
                     f"{r['perplexity']:.2f} | {r['tokens_per_s']:,.0f} | "
                     f"x{r['speedup']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path, dpi: int = 110):
    """Perplexity and forward speed-up against the share of heads removed; beside the measured
    speed-up, the parameter ratio (unpruned / pruned): the multiply-adds per token of the
    weights, so the speed-up a forward bound by its matmuls would reach."""
    from matplotlib.figure import Figure

    rows = results["rows"]
    share = [100 * r["removed"] / results["heads"] for r in rows]
    fig = Figure(figsize=(9.0, 3.8), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    ax.plot(share, [r["perplexity"] for r in rows], "o-")
    ax.set_xlabel("query heads removed (%)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{results['source']}: one-shot ablation ranking", fontsize=10)
    bx.plot(share, [r["speedup"] for r in rows], "o-", color="C1", label="measured")
    bx.plot(share, [rows[0]["params"] / r["params"] for r in rows], "--", color="gray",
            label="parameter ratio")
    bx.set_xlabel("query heads removed (%)")
    bx.set_ylabel("forward tokens/s, relative to unpruned")
    bx.set_title(f"speed ({rows[0]['tokens_per_s']:,.0f} tokens/s unpruned)", fontsize=10)
    bx.legend(fontsize=8)
    for a in (ax, bx):
        a.grid(alpha=0.3)
    fig.savefig(path, dpi=dpi)
    return path


def add_arguments(p: argparse.ArgumentParser, quick: bool = False) -> None:
    """The flags of ``experiments prune`` (it has no --quick; quick is ignored)."""
    pretrained_arguments(p, "UTF-8 English text: held-out split first, calibration split at its "
                            "end")
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS),
                   help="shares of the query heads to remove, each in (0, 1)")
    p.add_argument("--context", type=int, default=CONTEXT, help="tokens per window")
    p.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS,
                   help="tokens the heads are ranked on (a multiple of --context)")
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS,
                   help="held-out tokens each pruned model is evaluated on (a multiple of "
                        "--context)")
    p.add_argument("--timing-runs", type=int, default=5, help="timed forward passes per model")
    p.add_argument("--out", default="runs/prune",
                   help="results.md, results.json and prune.png go here")


def _check(p: argparse.ArgumentParser, args) -> None:
    for f in args.fractions:
        if not 0.0 < f < 1.0:
            p.error(f"argument --fractions: each must be in (0, 1), got {f}")
    if args.context < 1:
        p.error(f"argument --context: must be >= 1, got {args.context}")
    for flag, value in (("--calibration-tokens", args.calibration_tokens),
                        ("--eval-tokens", args.eval_tokens)):
        if value < args.context or value % args.context:
            p.error(f"argument {flag}: must be a positive multiple of --context "
                    f"{args.context}, got {value}")
    if args.timing_runs < 1:
        p.error(f"argument --timing-runs: must be >= 1, got {args.timing_runs}")
    check_paths(p, args.data, args.out, "--out")


def run(p: argparse.ArgumentParser, args) -> int:
    """Check the flags, load the model and the text, prune, write the results and the curve."""
    from pathlib import Path

    from minigpt.hf.pretrained import PretrainedError

    _check(p, args)
    try:
        model, tokenizer = load_pretrained(args.init_from)
    except (PretrainedError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.context > model.config.block_size:
        p.error(f"argument --context: at most the model's context {model.config.block_size}, "
                f"got {args.context}")
    try:
        check_fractions(model.config, args.fractions)
    except ValueError as e:
        p.error(f"argument {e}")
    tokens = text_tokens(args.data, tokenizer, args.eval_tokens + args.calibration_tokens + 2)
    heldout = windows(tokens[:args.eval_tokens + 1], args.context)
    calibration = windows(tokens[-args.calibration_tokens - 1:], args.context)
    results = prune_experiment(model, calibration, heldout, args.fractions, heldout[0][0][:1],
                               args.timing_runs)
    results.update(source=Path(args.init_from).name, data=Path(args.data).name,
                   context=args.context, calibration_tokens=args.calibration_tokens,
                   eval_tokens=args.eval_tokens, timing_shape=f"1 x {args.context}")
    write_results(args.out, results, markdown(results), plot, "prune.png")
    return 0
