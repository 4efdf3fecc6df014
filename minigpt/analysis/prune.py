"""Head pruning: remove the least important attention heads from the weights.

greedy_prune chooses the heads: measure the loss with each removable unit masked, remove the
unit of lowest loss, and measure again with it removed, until N query heads are gone. It
re-measures after every removal, since a head's importance changes once another head is gone.
Michel et al. 2019, "Are Sixteen Heads Really Better than One?" (NeurIPS 2019) prune heads
iteratively in order of an importance score (a first-order estimate of the ablation); here the
score is the ablation itself (minigpt.analysis.importance). Voita et al. 2019, "Analyzing
Multi-Head Self-Attention: Specialized Heads Do the Heavy Lifting, the Rest Can Be Pruned"
(ACL 2019) learn the gates instead, with a relaxed L0 penalty while training.

A unit is one head, except in grouped-query layers (prune_units): the query heads sharing a
key/value head must stay in equal, contiguous groups (minigpt.attention maps query head h to
key/value head h // group), so such a layer loses one query head per group at a time until the
groups are single heads; a key/value head goes only when its last query head does. A layer never
loses its last head.

prune_heads then cuts the removed heads' rows out of c_attn (q, and k and v of removed key/value
heads) and their columns out of c_proj: the layers compute fewer heads (GPTConfig.layer_heads,
layer_kv_heads), and the model's logits are those of the full model with the heads gated to 0.
pruned_checkpoint writes it as a checkpoint that GPT.from_checkpoint, sample.py and train.py
--resume read; finetune trains it a few steps more. The command line is `python -m minigpt heads
--prune N` (minigpt.analysis.heads).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from minigpt.analysis.importance import present_heads
from minigpt.checkpoint import load_checkpoint
from minigpt.train.config import TrainConfig
from minigpt.model import GPT
from minigpt.train.loop import train
from minigpt.train.optim import build_optimizer

Head = Tuple[int, int]  # (layer, head) in the model's own numbering


def max_prunable(cfg) -> int:
    """How many query heads greedy pruning can remove at most from a model of GPTConfig cfg:
    all but one in every layer."""
    return sum(cfg.heads(layer)[0] - 1 for layer in range(cfg.n_layer))


def prune_units(cfg, alive: torch.Tensor,
                layer_loss: Optional[Dict[Head, float]] = None) -> List[List[Head]]:
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


def _gqa_single_losses(cfg, alive: torch.Tensor,
                       loss_without: Callable[[List[Head]], float]) -> Dict[Head, float]:
    """{(layer, head): loss with that head removed too} for the live heads of every layer whose
    units are one head per key/value group (prune_units needs them to pick within groups)."""
    single = {}
    for layer in range(cfg.n_layer):
        nq, nkv = cfg.heads(layer)
        live = [h for h in range(nq) if alive[layer, h]]
        n_groups = len({h // (nq // nkv) for h in live})
        if 1 < n_groups < len(live):
            for h in live:
                single[(layer, h)] = loss_without([(layer, h)])
    return single


def greedy_prune(cfg, n: int, loss_fn: Callable[[torch.Tensor], float],
                 progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Remove n query heads one unit at a time, re-measuring after every removal.

    Each step measures, with the heads removed so far already masked, the loss with each
    removable unit (prune_units) masked as well, and removes the unit whose loss is lowest
    (smallest increase; ties go to the lower layer, then head). This is Michel et al. 2019's
    single-head ablation applied iteratively: a head that looked important may become redundant
    once another is gone, and the reverse. Units larger than the heads still to remove are
    skipped; if none fits, pruning stops early (only in GQA layers, whose units hold one head
    per group). Cost: one loss_fn call per candidate unit per step (plus one per live head of
    each GQA layer).

    Args:
        cfg: the model's GPTConfig (its per-layer head counts). n: query heads to remove,
            0 <= n <= max_prunable(cfg).
        loss_fn: callable((n_layer, n_head) float32 gates on the CPU, 0 = head masked) -> loss;
            e.g. minigpt.analysis.importance.evaluate_loss on fixed batches.
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

    def loss_without(heads: List[Head]) -> float:
        gates = alive.float()
        for layer, head in heads:
            gates[layer, head] = 0.0
        return loss_fn(gates)

    base_loss = current = loss_without([])
    steps, removed = [], 0
    while removed < n:
        single = _gqa_single_losses(cfg, alive, loss_without)
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


def _kept_heads(cfg, heads: Iterable[Head]) -> Tuple[List[List[int]], List[List[int]]]:
    """The query heads and the key/value heads each layer keeps when heads are removed:
    ([sorted kept query heads per layer], [sorted kept key/value heads per layer]). Raises as
    prune_heads."""
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
    return keep_q, keep_kv


def prune_heads(model: GPT, heads: Iterable[Head]) -> GPT:
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
    keep_q, keep_kv = _kept_heads(cfg, heads)
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
        # c_attn's rows are [q of nq heads | k of nkv heads | v of nkv heads], hd rows each.
        rows = [torch.arange(h * hd, (h + 1) * hd) for h in kq]  # q of the kept query heads
        rows += [torch.arange((nq + j) * hd, (nq + j + 1) * hd) for j in kkv]  # their k
        rows += [torch.arange((nq + nkv + j) * hd, (nq + nkv + j + 1) * hd) for j in kkv]  # v
        rows = torch.cat(rows).to(param.device)
        cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in kq]).to(param.device)
        state[prefix + "c_attn.weight"] = state[prefix + "c_attn.weight"][rows]
        if prefix + "c_attn.bias" in state:
            state[prefix + "c_attn.bias"] = state[prefix + "c_attn.bias"][rows]
        state[prefix + "c_proj.weight"] = state[prefix + "c_proj.weight"][:, cols]
        if prefix + "gate.weight" in state:  # attn_gate: one row per query head
            state[prefix + "gate.weight"] = state[prefix + "gate.weight"][kq]
    pruned.load_state_dict(state)
    return pruned.train(model.training)


@torch.no_grad()
def forward_throughput(models: Dict[str, GPT], x: torch.Tensor, runs: int = 7,
                       warmup: int = 2) -> Dict[str, float]:
    """Forward tokens per second of each model on the same int64 batch x (B, T), in eval mode
    and without gradients: warmup passes, then runs timed passes interleaved across the models
    (so a machine that slows down mid-measurement slows every model alike), median time per
    pass (time.perf_counter; torch.cuda.synchronize around each pass on CUDA).

    Returns:
        {name: B * T / median seconds per pass}.
    """
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
    """The checkpoint dict of a pruned model made from the checkpoint state: its weights (on
    the CPU) and config; with a training run's state (train_config), everything `train.py
    --resume` needs, the model in train_config replaced and a fresh optimizer state (moments of
    the removed heads' weights have no place in the smaller matrices, so every moment restarts
    at zero; the data sampler and RNG continue where training stopped; the trained weights
    restart from the pruned model, which is the weights' average with an EMA). info goes under
    "pruned" (what was removed and the measured losses)."""
    out = {"model": {k: v.detach().cpu() for k, v in pruned.state_dict().items()},
           "model_config": pruned.config.to_dict(), "tokenizer": state["tokenizer"],
           "pruned": info}
    if "train_config" in state:
        train_cfg = dict(state["train_config"], model=pruned.config.to_dict())
        device_type = next(pruned.parameters()).device.type
        optimizer = build_optimizer(pruned, TrainConfig.from_saved(train_cfg), device_type)
        out.update({k: v for k, v in state.items() if k not in out and k not in
                    ("optimizer", "train_config", "train_weights")})
        out.update(train_config=train_cfg, optimizer=optimizer.state_dict(),
                   best_val_loss=float("inf"), val_loss=None)
    return out


def finetune(ckpt_dir: Path, iters: int, data: Optional[str], device: str, log=print):
    """Train the pruned checkpoint in ckpt_dir for iters more steps, in place, with the
    training loop of minigpt.train.loop (train() resuming the checkpoint): the settings it was
    trained with, its data sampler and RNG where training stopped, a fresh optimizer state
    (pruned_checkpoint), and the learning rate at the end of its schedule (lr_decay_iters set
    to the original run's length, so every step runs at min_lr). data: another corpus, or None
    for the run's own. Returns the TrainResult.

    Raises: what minigpt.train.loop.train raises (DataError for a corpus that does not give the
    checkpoint's tokenizer, RunDirError, ...)."""
    state = load_checkpoint(ckpt_dir / "ckpt.pt")
    saved = TrainConfig.from_saved(state["train_config"])
    start = state["iter_num"]
    cfg = replace(saved, out_dir=str(ckpt_dir), resume=True, overwrite=False,
                  max_iters=start + iters, lr_decay_iters=saved.lr_decay_iters or saved.max_iters,
                  max_time=0.0, eval_interval=iters, progress=False, device=device,
                  compile=False, data=data if data is not None else saved.data)
    return train(cfg, log=log, resume_state=state)
