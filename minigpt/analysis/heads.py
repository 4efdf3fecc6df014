"""Head importance: how much the validation loss rises when one attention head is masked; and
head pruning, which removes the least important heads from the weights.

    python -m minigpt heads --checkpoint out/ckpt.pt
    python -m minigpt heads --checkpoint out/ --mask 3:1 --mask 0:2 --json heads.json
    python -m minigpt heads --init-from DIR --data my.txt   # a pretrained GPT-2 or Llama
    python -m minigpt heads --checkpoint out/ --prune 6 --out pruned/ --finetune-iters 100

Each head's output is multiplied by a gate before the layer's output projection c_proj
(GPT.gated_heads); a gate of 0 removes the head. The loss on a fixed set of
validation batches is measured with every head on, then with each head masked alone; the
difference is that head's importance. This is the ablation of Michel et al. 2019, "Are Sixteen
Heads Really Better than One?" (removing one head at test time; they find most heads can go with
little loss), on our small model. --mask L:H masks heads by hand first: the base loss and every
row are then measured with those heads already removed.

Prints a layers x heads grid and a table sorted by increase, and writes a heatmap PNG (--out).

--prune N --out DIR: greedy pruning (greedy_prune). Measure the loss with each removable unit
masked, remove the unit of lowest loss, and measure again with it removed, until N query heads
are gone: re-measuring after every removal, since a head's importance changes once another head
is gone (Michel et al. 2019 prune heads in order of an importance score; here the score is the
ablation itself).
A unit is one head, except in grouped-query layers (prune_units): the query heads sharing a
key/value head must stay in equal, contiguous groups (minigpt.attention maps query head h to
key/value head h // group), so such a layer loses one query head per group at a time until
the groups are single heads; a key/value head goes only when its last query head does. A layer
never loses its last head: once down to one, it is skipped. Then prune_heads cuts the removed
heads' rows out of c_attn (q, and k and v of removed key/value heads) and their columns out of
c_proj: the layers now compute fewer heads (GPTConfig.layer_heads, layer_kv_heads), and the
model's logits are those of the full model with the heads gated to 0. Reported: parameters,
forward tokens/s (before and after, timed alternately on one batch, median of --timing-runs
passes after 2 warmup) and the loss before and after; --finetune-iters K then trains the pruned
checkpoint K steps with minigpt.train.loop (the checkpoint's settings, at its final learning rate)
and reports the loss after that. Writes DIR/ckpt.pt (GPT.from_checkpoint, sample.py and
train.py --resume read it), the loss-against-heads-removed curve (--prune-plot, default
DIR/prune.png) and --json. The loss is measured on the same fixed batches throughout.

Exit codes: 0 done, 2 bad input (arguments, checkpoint, data).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from minigpt.checkpoint import (CheckpointError, atomic_write_text, checkpoint_file, load_checkpoint,
                         save_checkpoint)
from minigpt.train.data import BatchSampler, DataError, load_corpus
from minigpt.train.loop import mean_loss
from minigpt.model import GPT
from minigpt.hf.pretrained import add_model_source_args, pretrained_state
from minigpt.tokenizer import from_state
from minigpt.runtime import (ArgumentParser, DeviceError, PathError, check_file_target, cli_main,
                      pick_device)


def parse_mask(specs: Sequence[str], n_layer: int, n_head: int,
               layer_heads: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Heads given as "L:H" strings (negative L counts from the end) -> (n_layer, n_head) float
    gates, 0 for the listed heads and 1 elsewhere. layer_heads: each layer's head count when
    they differ (a pruned model, GPTConfig.layer_heads); None = n_head everywhere.

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
    """(n_layer, n_head) bool: True where layer l has head h (h < its head count; all True
    unless GPTConfig.layer_heads is set)."""
    counts = torch.tensor([cfg.heads(layer)[0] for layer in range(cfg.n_layer)])
    return torch.arange(cfg.n_head)[None, :] < counts[:, None]


@torch.no_grad()
def evaluate_loss(model: GPT, batches, head_mask: Optional[torch.Tensor] = None) -> float:
    """Mean cross-entropy (nats/token) of model over batches [(x, y), ...] (mean_loss of the
    training loop), with the (n_layer, n_head) head_mask gates (None: all heads on)."""
    gates = model.gated_heads(head_mask) if head_mask is not None else contextlib.nullcontext()
    with gates:
        return mean_loss(model, batches).item()


def head_importance(model: GPT, batches, base_mask: Optional[torch.Tensor] = None,
                    progress=None) -> dict:
    """Loss with each head masked alone (Michel et al. 2019), on fixed batches.

    Args:
        model: a GPT. batches: list of (x, y) int64 (B, T) pairs.
        base_mask: (n_layer, n_head) gates applied in every measurement (heads masked by hand),
            or None (all ones).
        progress: optional callable(done, total) after each measurement.

    Returns:
        {"base_loss": float, "loss": (n_layer, n_head) float64 tensor, "increase": loss -
        base_loss, "masked": (n_layer, n_head) bool, the heads base_mask already removes
        and those a pruned layer lacks (their loss and increase are NaN)}.
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


def prune_units(cfg, alive: torch.Tensor, layer_loss=None) -> List[List[Tuple[int, int]]]:
    """The sets of heads that greedy pruning may remove next, each keeping every layer valid.

    A layer's query heads are grouped by the key/value head they share (query head h of a layer
    with nq query and nkv key/value heads uses key/value head h // (nq / nkv): contiguous,
    equal groups, as minigpt.attention requires). Removing heads must keep the groups equal, so
    per layer:
    - plain multi-head attention (every live group holds one query head), and multi-query
      attention (one key/value head left): each live query head alone is a unit; in MHA its key
      and value head go with it;
    - grouped-query attention with several live groups of more than one query head: one unit,
      one query head from every group (the one whose removal alone raises the loss least,
      layer_loss[(l, h)]), so the groups shrink together. Once they are down to one query head
      each, the layer is MHA-like and its heads go one at a time, each with its key/value head.
      A key/value head is thus removed only when its last query head goes.
    A layer with one live head is skipped: no layer drops to 0 heads.

    Args:
        cfg: the model's GPTConfig. alive: (n_layer, n_head) bool, the heads still present.
        layer_loss: {(layer, head): loss with that head removed alone}, needed for GQA layers.

    Returns:
        A list of units, each a list of (layer, head) in the model's own head numbering.
    """
    units = []
    for layer in range(cfg.n_layer):
        nq, nkv = cfg.heads(layer)
        group = nq // nkv
        live = [h for h in range(nq) if alive[layer, h]]
        if len(live) <= 1:
            continue
        groups: Dict[int, List[int]] = {}
        for h in live:
            groups.setdefault(h // group, []).append(h)
        if len(groups) == 1 or len(live) == len(groups):
            units.extend([[(layer, h)] for h in live])
        else:
            units.append([(layer, min(g, key=lambda h: (layer_loss[(layer, h)], h)))
                          for g in groups.values()])
    return units


def max_prunable(cfg) -> int:
    """How many query heads greedy pruning can remove at most: all but one in every layer."""
    return sum(cfg.heads(layer)[0] - 1 for layer in range(cfg.n_layer))


def greedy_prune(cfg, n: int, loss_fn: Callable[[torch.Tensor], float],
                 progress=None) -> dict:
    """Remove n query heads one unit at a time, re-measuring after every removal.

    Each step measures, with the heads removed so far already masked, the loss with each
    removable unit (prune_units) masked as well, and removes the unit whose loss is lowest
    (smallest increase; ties go to the lower layer, then head). This is Michel et al. 2019's
    single-head ablation ("Are Sixteen Heads Really Better than One?") applied iteratively: a head
    that looked important may become redundant once another is gone, and the reverse.
    Units larger than the heads still to remove are skipped; if none fits, pruning stops early
    (only in GQA layers, whose units hold one head per group).

    Args:
        cfg: the model's GPTConfig (its per-layer head counts). n: query heads to remove,
            0 <= n <= max_prunable(cfg).
        loss_fn: callable((n_layer, n_head) float gates, 0 = head masked) -> loss; e.g.
            evaluate_loss on fixed batches.
        progress: optional callable(step, units measured in that step).

    Returns:
        {"base_loss": loss with every head, "steps": [{"removed": [(l, h), ...], "loss",
        "increase" (over the previous step's loss), "candidates": [(unit, loss), ...]}, ...],
        "alive": (n_layer, n_head) bool after the last step}.

    Raises:
        ValueError: n out of range (the message names n and the limit).
    """
    limit = max_prunable(cfg)
    if not 0 <= n <= limit:
        raise ValueError(f"n must be in 0..{limit} (all heads but one per layer), got {n}")
    alive = present_heads(cfg)

    def loss_without(heads) -> float:
        gates = alive.float()
        for layer, head in heads:
            gates[layer, head] = 0.0
        return loss_fn(gates)

    base_loss = current = loss_without([])
    steps, removed = [], 0
    while removed < n:
        single = {}
        for layer in range(cfg.n_layer):
            nq, nkv = cfg.heads(layer)
            live = [h for h in range(nq) if alive[layer, h]]
            n_groups = len({h // (nq // nkv) for h in live})
            if 1 < n_groups < len(live):  # GQA: pick within groups by single-head losses
                for h in live:
                    single[(layer, h)] = loss_without([(layer, h)])
        units = [u for u in prune_units(cfg, alive, single) if len(u) <= n - removed]
        if not units:
            break
        candidates = [(u, single[u[0]] if len(u) == 1 and u[0] in single else loss_without(u))
                      for u in units]
        unit, loss = min(candidates, key=lambda c: (c[1], c[0]))
        for layer, head in unit:
            alive[layer, head] = False
        removed += len(unit)
        steps.append({"removed": unit, "loss": loss, "increase": loss - current,
                      "candidates": candidates})
        current = loss
        if progress is not None:
            progress(len(steps), len(candidates))
    return {"base_loss": base_loss, "steps": steps, "alive": alive}


def prune_heads(model: GPT, heads: Iterable[Tuple[int, int]]) -> GPT:
    """A smaller copy of model without the given attention heads: the q, k, v rows of c_attn
    and the input columns of c_proj of each removed head are cut out, so the layer computes
    fewer heads (GPTConfig.layer_heads / layer_kv_heads). The result computes exactly what model
    computes with those heads gated to 0 (GPT.gated_heads), up to float rounding: a head's
    output enters the residual stream only through its columns of c_proj.

    A key/value head goes when no query head using it is left; the remaining groups must stay
    equal (see prune_units). The copy has model's dtype, device and train/eval mode; model is
    unchanged, and so is the global RNG.

    Args:
        model: a GPT. heads: (layer, head) pairs in model's numbering (a pruned model's layer l
            has heads 0..layer_heads[l]-1).

    Raises:
        ValueError: a head out of range, a layer left with no head, key/value groups of
            unequal size (the message names the layer), or an ALiBi model.
    """
    cfg = model.config
    if cfg.pos_embedding == "alibi":
        raise ValueError("prune_heads: model: pos_embedding='alibi' models cannot be pruned "
                         "(each head's slope depends on its index among n_head)")
    remove: Dict[int, set] = {layer: set() for layer in range(cfg.n_layer)}
    for layer, head in heads:
        if not (0 <= layer < cfg.n_layer and 0 <= head < cfg.heads(layer)[0]):
            raise ValueError(f"prune_heads: heads: ({layer}, {head}) is not a head of this model "
                             f"({cfg.n_layer} layers; head counts "
                             f"{[cfg.heads(l)[0] for l in range(cfg.n_layer)]})")
        remove[layer].add(head)
    keep_q, keep_kv = [], []
    for layer in range(cfg.n_layer):
        nq, nkv = cfg.heads(layer)
        group = nq // nkv
        kq = [h for h in range(nq) if h not in remove[layer]]
        if not kq:
            raise ValueError(f"prune_heads: heads: layer {layer} would have no head left")
        per_kv: Dict[int, int] = {}
        for h in kq:
            per_kv[h // group] = per_kv.get(h // group, 0) + 1
        if len(set(per_kv.values())) != 1:
            raise ValueError(f"prune_heads: heads: layer {layer} would keep unequal numbers of "
                             f"query heads per key/value head {dict(sorted(per_kv.items()))} "
                             f"(grouped-query attention needs equal groups)")
        keep_q.append(kq)
        keep_kv.append(sorted(per_kv))
    new_cfg = replace(cfg, layer_heads=tuple(len(k) for k in keep_q),
                      layer_kv_heads=tuple(len(k) for k in keep_kv))
    param = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        pruned = GPT(new_cfg).to(device=param.device, dtype=param.dtype)
    hd = cfg.head_dim
    state = model.state_dict()
    for layer, (kq, kkv) in enumerate(zip(keep_q, keep_kv)):
        nq, nkv = cfg.heads(layer)
        prefix = f"transformer.h.{layer}.attn."
        rows = [torch.arange(h * hd, (h + 1) * hd) for h in kq]  # q of the kept query heads
        rows += [torch.arange((nq + j) * hd, (nq + j + 1) * hd) for j in kkv]  # their k
        rows += [torch.arange((nq + nkv + j) * hd, (nq + nkv + j + 1) * hd) for j in kkv]  # v
        rows = torch.cat(rows).to(param.device)
        cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in kq]).to(param.device)
        state[prefix + "c_attn.weight"] = state[prefix + "c_attn.weight"][rows]
        if prefix + "c_attn.bias" in state:
            state[prefix + "c_attn.bias"] = state[prefix + "c_attn.bias"][rows]
        state[prefix + "c_proj.weight"] = state[prefix + "c_proj.weight"][:, cols]
    pruned.load_state_dict(state)
    return pruned.train(model.training)


@torch.no_grad()
def forward_throughput(models: Dict[str, GPT], x: torch.Tensor, runs: int = 7,
                       warmup: int = 2) -> Dict[str, float]:
    """Forward tokens per second of each model on the same batch x (B, T), in eval mode and
    without gradients: warmup passes, then runs timed passes interleaved across the models
    (so a machine that slows down mid-measurement slows every model alike), median time per
    pass (time.perf_counter; torch.cuda.synchronize around each pass on CUDA)."""
    times: Dict[str, list] = {name: [] for name in models}
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            model(x)
    for _ in range(runs):
        for name, model in models.items():
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: x.numel() / statistics.median(t) for name, t in times.items()}


def pruned_checkpoint(state: dict, pruned: GPT, info: dict) -> dict:
    """The checkpoint dict of a pruned model made from the checkpoint state: its weights and
    config; with a training run's state (train_config), everything `train.py --resume`
    needs, the model in train_config replaced and a fresh optimizer state (moments of the
    removed heads' weights have no place in the smaller matrices, so every moment restarts
    at zero; the data sampler and RNG continue where training stopped). info goes under
    "pruned" (what was removed and the measured losses)."""
    out = {"model": {k: v.detach().cpu() for k, v in pruned.state_dict().items()},
           "model_config": pruned.config.to_dict(), "tokenizer": state["tokenizer"],
           "pruned": info}
    if "train_config" in state:
        from minigpt.train.config import TrainConfig
        from minigpt.train.optim import build_optimizer

        train_cfg = dict(state["train_config"], model=pruned.config.to_dict())
        device_type = next(pruned.parameters()).device.type
        optimizer = build_optimizer(pruned, TrainConfig.from_saved(train_cfg), device_type)
        out.update({k: v for k, v in state.items() if k not in out and k not in
                    ("optimizer", "train_config")})
        out.update(train_config=train_cfg, optimizer=optimizer.state_dict(),
                   best_val_loss=float("inf"), val_loss=None)
    return out


def format_grid(increase: torch.Tensor, masked: torch.Tensor) -> str:
    """The layers x heads grid of increases as text ("masked" for pre-masked heads)."""
    L, H = increase.shape
    lines = ["         " + "".join(f"{'head ' + str(h):>9}" for h in range(H))]
    for layer in range(L):
        cells = ["masked" if masked[layer, h] else f"{increase[layer, h].item():+.4f}"
                 for h in range(H)]
        lines.append(f"layer {layer:<3}" + "".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """One row per measured head, the most important (largest increase) first."""
    loss, inc, masked = result["loss"], result["increase"], result["masked"]
    rows = [(inc[l, h].item(), l, h) for l in range(inc.shape[0]) for h in range(inc.shape[1])
            if not masked[l, h]]
    rows.sort(key=lambda r: -r[0])
    lines = [f"{'rank':>4} {'layer':>5} {'head':>4} {'val loss':>9} {'increase':>9}"]
    for rank, (value, layer, head) in enumerate(rows, 1):
        lines.append(f"{rank:>4} {layer:>5} {head:>4} {loss[layer, head].item():>9.4f} "
                     f"{value:>+9.4f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m minigpt heads",
                                description="Loss increase when each attention head is masked "
                                            "(Michel et al. 2019).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_source_args(p, "; needs --data")
    p.add_argument("--data", default=None,
                   help="UTF-8 text file to evaluate on, tokenized with the model's "
                        "tokenizer; None = the checkpoint's training data")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per sequence; None = the model's block_size (with "
                        "--init-from, at most 256)")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--batches", type=int, default=20, help="fixed batches to evaluate on")
    p.add_argument("--batch-size", type=int, default=12, help="sequences per batch")
    p.add_argument("--seed", type=int, default=1337, help="seed of the batch positions")
    p.add_argument("--mask", action="append", default=[], metavar="L:H",
                   help="mask this head (layer:head) in every measurement; repeatable")
    p.add_argument("--out", default=None,
                   help="heatmap image; None = heads.png beside the checkpoint. With --prune: "
                        "the directory of the pruned checkpoint (required)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--device", default="auto")
    prune = p.add_argument_group("pruning")
    prune.add_argument("--prune", type=int, default=None, metavar="N",
                       help="remove the N least important query heads, greedily (re-measured "
                            "after each removal), and write the smaller model to --out")
    prune.add_argument("--prune-plot", default=None, metavar="PNG",
                       help="curve of val loss against heads removed; None = OUT/prune.png")
    prune.add_argument("--finetune-iters", type=int, default=0, metavar="K",
                       help="then train the pruned model K steps (the checkpoint's training "
                            "settings, at the end of its learning-rate schedule) into --out")
    prune.add_argument("--timing-runs", type=int, default=7,
                       help="timed forward passes per model for tokens/s (median, after 2 "
                            "warmup passes)")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace a checkpoint already in --out")
    return p


def write_json(path, obj) -> None:
    """obj as indented JSON, written atomically (minigpt.checkpoint.atomic_write_text)."""
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def check_prune_args(parser: argparse.ArgumentParser, args) -> None:
    """Argument checks of --prune and its options that need no model (argparse errors, exit 2);
    the limit on --prune is checked once the model is read."""
    given = [flag for flag, on in (("--prune-plot", args.prune_plot is not None),
                                   ("--finetune-iters", args.finetune_iters != 0),
                                   ("--overwrite", args.overwrite)) if on]
    if args.prune is None:
        if given:
            parser.error(f"argument {given[0]}: only with --prune")
        return
    if args.prune < 1:
        parser.error(f"argument --prune: must be >= 1, got {args.prune}")
    if args.out is None:
        parser.error("argument --out: required with --prune (the directory to write the "
                     "pruned checkpoint to)")
    if args.mask:
        parser.error("argument --mask: not with --prune (pruning chooses the heads)")
    if args.finetune_iters < 0:
        parser.error(f"argument --finetune-iters: must be >= 0, got {args.finetune_iters}")
    if args.finetune_iters and args.init_from is not None:
        parser.error("argument --finetune-iters: needs a minigpt checkpoint (--checkpoint) with "
                     "its training settings; --init-from has none")
    if args.timing_runs < 1:
        parser.error(f"argument --timing-runs: must be >= 1, got {args.timing_runs}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: {out} is a file; --prune writes a directory")
    if (out / "ckpt.pt").exists() and not args.overwrite:
        parser.error(f"argument --out: {out} already holds a ckpt.pt; pass --overwrite to "
                     f"replace it")


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def finetune(ckpt_dir: Path, iters: int, data: Optional[str], device: str, log=print):
    """Train the pruned checkpoint in ckpt_dir for iters more steps, in place, with the
    training loop of minigpt.train.loop (train() resuming the checkpoint): the settings it was
    trained with, its data sampler and RNG where training stopped, a fresh optimizer state
    (pruned_checkpoint), and the learning rate at the end of its schedule (lr_decay_iters set
    to the original run's length, so every step runs at min_lr). Returns the TrainResult.

    Raises: what minigpt.train.loop.train raises (DataError for a corpus that does not give the
    checkpoint's tokenizer, RunDirError, ...)."""
    from minigpt.train.config import TrainConfig
    from minigpt.train.loop import train

    state = load_checkpoint(ckpt_dir / "ckpt.pt")
    saved = TrainConfig.from_saved(state["train_config"])
    start = state["iter_num"]
    cfg = replace(saved, out_dir=str(ckpt_dir), resume=True, overwrite=False,
                  max_iters=start + iters, lr_decay_iters=saved.lr_decay_iters or saved.max_iters,
                  max_time=0.0, eval_interval=iters, progress=False, device=device,
                  compile=False, data=data if data is not None else saved.data)
    return train(cfg, log=log, resume_state=state)


def run_prune(args, state: dict, model: GPT, batches, source: str, plot_path: Path,
              plot_fn) -> int:
    """The --prune command: greedy pruning, the smaller model written to args.out, the report
    (parameters, tokens/s, val loss before / after / after fine-tuning), the curve and JSON."""
    cfg = model.config
    device = next(model.parameters()).device
    out_dir = Path(args.out)

    def progress(step, measured):
        print(f"  step {step}: measured {measured} candidate units", file=sys.stderr)

    result = greedy_prune(cfg, args.prune, lambda g: evaluate_loss(model, batches, g.to(device)),
                          progress=progress)
    print(f"\n{'step':>4} {'removed':>14} {'heads left':>10} {args.split + ' loss':>9} "
          f"{'increase':>9} {'candidates':>10}")
    left = sum(cfg.heads(layer)[0] for layer in range(cfg.n_layer))
    print(f"{0:>4} {'-':>14} {left:>10} {result['base_loss']:>9.4f} {'':>9} {'':>10}")
    for i, step in enumerate(result["steps"], 1):
        left -= len(step["removed"])
        names = ",".join(head_name(*h) for h in step["removed"])
        print(f"{i:>4} {names:>14} {left:>10} {step['loss']:>9.4f} {step['increase']:>+9.4f} "
              f"{len(step['candidates']):>10}")
    removed = [h for step in result["steps"] for h in step["removed"]]
    if len(removed) < args.prune:
        print(f"note: stopped after {len(removed)} of {args.prune} heads: every unit left is "
              f"larger than the heads still to remove (grouped-query layers shrink one head per "
              f"key/value group at a time)")

    pruned = prune_heads(model, removed).eval()
    loss_after = evaluate_loss(pruned, batches)
    masked_loss = result["steps"][-1]["loss"] if result["steps"] else result["base_loss"]
    x = batches[0][0]
    speed = forward_throughput({"before": model, "after": pruned}, x, runs=args.timing_runs)
    params = {"before": model.num_params(), "after": pruned.num_params()}
    info = {"source": source, "removed": [list(h) for h in removed],
            "layer_heads": list(pruned.config.layer_heads),
            "layer_kv_heads": list(pruned.config.layer_kv_heads),
            "split": args.split, "base_loss": result["base_loss"], "loss": loss_after}
    save_checkpoint(pruned_checkpoint(state, pruned, info), out_dir / "ckpt.pt")
    print(f"\npruned checkpoint: {out_dir / 'ckpt.pt'} (heads per layer "
          f"{list(pruned.config.layer_heads)}, key/value heads "
          f"{list(pruned.config.layer_kv_heads)}; removed "
          f"{', '.join(head_name(*h) for h in removed)})")

    loss_ft, ft_iters = None, 0
    if args.finetune_iters:
        from minigpt.config import ConfigError
        from minigpt.train.rundir import RunDirError

        try:
            ft = finetune(out_dir, args.finetune_iters, args.data, args.device,
                          log=lambda msg: print(f"  finetune: {msg}"))
        except (DataError, RunDirError, CheckpointError, ConfigError, DeviceError) as e:
            print(f"error: --finetune-iters: {e}", file=sys.stderr)
            return 2
        tuned_state = load_checkpoint(out_dir / "ckpt.pt")
        # Training wrote its own checkpoint: carry over what pruning removed.
        tuned_state["pruned"] = dict(info, finetune_iters=args.finetune_iters)
        save_checkpoint(tuned_state, out_dir / "ckpt.pt")
        tuned = GPT.from_checkpoint(tuned_state).to(device).eval()
        loss_ft, ft_iters = evaluate_loss(tuned, batches), ft.iters
        print(f"fine-tuned for {args.finetune_iters} steps (to step {ft.iters}); the checkpoint "
              f"in {out_dir} now holds the fine-tuned model")

    how = (f"{x.shape[0]} x {x.shape[1]} tokens per forward, median of {args.timing_runs} "
           f"after 2 warmup, {device}")
    print(f"\n{'':<22} {'before':>12} {'after':>12}" + (f" {'fine-tuned':>12}" if loss_ft
                                                          is not None else ""))
    print(f"{'heads':<22} {sum(cfg.heads(l)[0] for l in range(cfg.n_layer)):>12} "
          f"{sum(pruned.config.layer_heads):>12}")
    print(f"{'parameters':<22} {params['before']:>12,} {params['after']:>12,}")
    print(f"{'tokens/s (forward)':<22} {speed['before']:>12,.0f} {speed['after']:>12,.0f}   "
          f"x{speed['after'] / speed['before']:.2f} ({how})")
    print(f"{args.split + ' loss':<22} {result['base_loss']:>12.4f} {loss_after:>12.4f}"
          + (f" {loss_ft:>12.4f}" if loss_ft is not None else ""))
    if abs(loss_after - masked_loss) > 1e-4 * max(1.0, abs(masked_loss)):
        print(f"warning: the pruned model's loss {loss_after:.6f} differs from the masked "
              f"model's {masked_loss:.6f}", file=sys.stderr)

    counts = [0]
    for step in result["steps"]:
        counts.append(counts[-1] + len(step["removed"]))
    curve = [result["base_loss"]] + [step["loss"] for step in result["steps"]]
    if plot_fn is not None:
        labels = [",".join(head_name(*h) for h in step["removed"]) for step in result["steps"]]
        plot_fn(counts, curve, plot_path, finetuned=loss_ft, labels=labels,
                title=f"{args.split} loss as heads are removed (greedy; {source})")
        print(f"\nprune curve: {plot_path}")
    if args.json:
        write_json(args.json, {
            "checkpoint": source, "out": str(out_dir), "split": args.split,
            "tokens": sum(b[0].numel() for b in batches), "batches": args.batches,
            "batch_size": args.batch_size, "seed": args.seed, "prune": args.prune,
            "removed": [[list(h) for h in step["removed"]] for step in result["steps"]],
            "heads_removed": counts, "loss_curve": curve,
            "layer_heads": list(pruned.config.layer_heads),
            "layer_kv_heads": list(pruned.config.layer_kv_heads),
            "params": params, "tokens_per_s": speed, "timing": how,
            "loss": {"before": result["base_loss"], "after": loss_after,
                     "after_masked": masked_loss, "finetuned": loss_ft},
            "finetune_iters": args.finetune_iters, "finetuned_to_step": ft_iters or None,
        })
        print(f"json: {args.json}")
    return 0


@cli_main
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batches", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= 1, got "
                         f"{getattr(args, name)}")
    if args.init_from is not None and args.data is None:
        parser.error("argument --data: required with --init-from (a pretrained model has no "
                     "training data of ours)")
    if args.block_size is not None and args.block_size < 1:
        parser.error(f"argument --block-size: must be >= 1, got {args.block_size}")
    check_prune_args(parser, args)
    if args.json:
        try:
            check_file_target(args.json, "--json")
        except PathError as e:
            parser.error(f"argument {e}")
    path = None if args.init_from else checkpoint_file(args.checkpoint or "out/ckpt.pt")
    source = args.init_from or str(path)
    try:
        state = (pretrained_state(args.init_from) if args.init_from is not None
                 else load_checkpoint(path))
        tokenizer = from_state(state["tokenizer"])
        train_cfg = state.get("train_config", {})
        data = args.data if args.data is not None else train_cfg.get("data")
        # "char" is rebuilt from the text (and compared below); the others are fixed.
        corpus = load_corpus(data, "char" if tokenizer.name == "char" else tokenizer)
        if args.data is None and corpus.tokenizer.state_dict() != tokenizer.state_dict():
            raise DataError(f"the corpus {corpus.source} does not give the checkpoint's "
                            f"tokenizer (a different text?); pass --data")
    except (CheckpointError, DataError, OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = GPT.from_checkpoint(state)
    model_cfg = model.config
    block_size = args.block_size or (min(256, model_cfg.block_size) if args.init_from
                                     else model_cfg.block_size)
    if block_size > model_cfg.block_size:
        parser.error(f"argument --block-size: the model's context is {model_cfg.block_size}, "
                     f"got {block_size}")
    try:
        base_mask = parse_mask(args.mask, model_cfg.n_layer, model_cfg.n_head,
                               model_cfg.layer_heads)
    except ValueError as e:
        parser.error(f"argument --mask: {e}")
    if args.prune is not None:
        if model_cfg.pos_embedding == "alibi":
            parser.error("argument --prune: models with pos_embedding='alibi' cannot be pruned "
                         "(each head's slope depends on its index among n_head)")
        limit = max_prunable(model_cfg)
        if args.prune > limit:
            counts = [model_cfg.heads(layer)[0] for layer in range(model_cfg.n_layer)]
            parser.error(f"argument --prune: at most {limit} heads can be removed (every layer "
                         f"keeps one; heads per layer {counts}), got {args.prune}")
        if path is not None and Path(args.out).resolve() == path.parent.resolve():
            parser.error(f"argument --out: {args.out} holds the checkpoint being pruned; "
                         f"choose another directory")
        out = Path(args.prune_plot) if args.prune_plot else Path(args.out) / "prune.png"
        Path(args.out).mkdir(parents=True, exist_ok=True)
    else:
        out = Path(args.out) if args.out else (path.with_name("heads.png") if path is not None
                                               else Path("heads.png"))
    try:
        from minigpt.analysis.pictures import image_path_error, plot_head_importance, plot_prune_curve
    except ImportError as e:
        print(f"no {'plot' if args.prune is not None else 'heatmap'}: matplotlib is not "
              f"available ({e})", file=sys.stderr)
        plot_head_importance = plot_prune_curve = None
    else:
        problem = image_path_error(out)
        if problem:
            parser.error(f"argument --{'prune-plot' if args.prune is not None else 'out'}: "
                         f"{problem}")
    try:
        device = pick_device(args.device)
    except DeviceError as e:
        parser.error(f"argument --device: {e}")
    model.to(device).eval()

    tokens = corpus.split(args.split)
    if args.data is not None and corpus.tokenizer.state_dict() != tokenizer.state_dict():
        # A char vocabulary is rebuilt from each text: re-encode with the checkpoint's own.
        text = corpus.tokenizer.decode(tokens.tolist())
        try:
            tokens = np.array(tokenizer.encode(text), dtype=np.int64)
        except ValueError as e:
            print(f"error: --data {args.data}: {e}", file=sys.stderr)
            return 2
    try:
        sampler = BatchSampler(tokens, block_size, args.batch_size, seed=args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batches = [sampler.next(device) for _ in range(args.batches)]
    n_tokens = args.batches * args.batch_size * block_size
    if args.prune is not None:
        counts = [model_cfg.heads(layer)[0] for layer in range(model_cfg.n_layer)]
        print(f"minigpt.analysis.heads --prune {args.prune}: {source} ({model_cfg.n_layer} layers, heads "
              f"per layer {counts}), {args.split} split of {corpus.source}, {args.batches} "
              f"batches x {args.batch_size} x {block_size} tokens = {n_tokens:,} tokens "
              f"(seed {args.seed})")
        return run_prune(args, state, model, batches, source, out,
                         plot_prune_curve if plot_head_importance is not None else None)
    pre = [f"L{l}H{h}" for l, h in (base_mask == 0).nonzero().tolist()]
    shape = (f"{model_cfg.n_layer} layers x {model_cfg.n_head} heads"
             if model_cfg.layer_heads is None else
             f"{model_cfg.n_layer} layers, heads per layer {list(model_cfg.layer_heads)} (pruned)")
    print(f"minigpt.analysis.heads: {source} ({shape}), "
          f"{args.split} split of {corpus.source}, {args.batches} batches x {args.batch_size} x "
          f"{block_size} tokens = {n_tokens:,} tokens (seed {args.seed})")
    if pre:
        print(f"masked by hand in every measurement: {', '.join(pre)}")

    result = head_importance(model, batches, base_mask)
    print(f"base {args.split} loss: {result['base_loss']:.4f}"
          + (" (all heads on)" if not pre else f" (with {', '.join(pre)} masked)"))
    which = ("each head is masked alone" if not pre
             else f"one more head is masked (besides {', '.join(pre)})")
    print(f"\nloss increase when {which}\n({args.split} loss with it masked - base loss, "
          f"nats/token):")
    print(format_grid(result["increase"], result["masked"]))
    print()
    print(format_table(result))

    if plot_head_importance is not None:
        title = (f"{args.split} loss increase when one head is masked\n(base {args.split} loss "
                 f"{result['base_loss']:.4f} on {n_tokens:,} tokens"
                 + (f"; masked by hand: {', '.join(pre)})" if pre else ")"))
        plot_head_importance(result["increase"], out, base_loss=result["base_loss"],
                             masked=result["masked"], title=title)
        print(f"\nheatmap: {out}")
    if args.json:
        def rows(t):
            return [[None if v != v else v for v in row] for row in t.tolist()]

        write_json(args.json, {
            "checkpoint": source, "split": args.split, "source": corpus.source,
            "tokens": n_tokens, "batches": args.batches, "batch_size": args.batch_size,
            "seed": args.seed, "masked_by_hand": (base_mask == 0).nonzero().tolist(),
            "base_loss": result["base_loss"], "loss": rows(result["loss"]),
            "increase": rows(result["increase"]),
        })
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
