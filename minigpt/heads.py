"""Head importance: how much the validation loss rises when one attention head is masked.

    python -m minigpt.heads --checkpoint out/ckpt.pt
    python -m minigpt.heads --checkpoint out/ --mask 3:1 --mask 0:2 --json heads.json
    python -m minigpt.heads --init-from DIR --data my.txt   # a pretrained GPT-2 or Llama

Each head's output is multiplied by a gate before the layer's output projection c_proj
(GPT.gated_heads); a gate of 0 removes the head. The loss on a fixed set of
validation batches is measured with every head on, then with each head masked alone; the
difference is that head's importance. This is the ablation of Michel et al. 2019, "Are Sixteen
Heads Really Better than One?" (removing one head at test time; they find most heads can go with
little loss), on our small model. --mask L:H masks heads by hand first: the base loss and every
row are then measured with those heads already removed.

Prints a layers x heads grid and a table sorted by increase, and writes a heatmap PNG (--out).
Exit codes: 0 done, 2 bad input (arguments, checkpoint, data).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .checkpoint import CheckpointError, checkpoint_file, load_checkpoint
from .data import BatchSampler, DataError, load_corpus
from .model import GPT
from .pretrained import add_model_source_args, pretrained_state
from .tokenizer import from_state
from .runtime import DeviceError, pick_device


def parse_mask(specs: Sequence[str], n_layer: int, n_head: int) -> torch.Tensor:
    """Heads given as "L:H" strings (negative L counts from the end) -> (n_layer, n_head) float
    gates, 0 for the listed heads and 1 elsewhere.

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
        gates[layer % n_layer, head] = 0.0
    return gates


@torch.no_grad()
def evaluate_loss(model: GPT, batches, head_mask: Optional[torch.Tensor] = None) -> float:
    """Mean cross-entropy (nats/token) of model over batches [(x, y), ...], in eval mode, with
    the (n_layer, n_head) head_mask gates (None: all heads on). Every batch has the same size,
    so the mean of batch means is the mean over tokens."""
    was_training = model.training
    model.eval()
    gates = model.gated_heads(head_mask) if head_mask is not None else contextlib.nullcontext()
    try:
        total = 0.0
        with gates:
            for x, y in batches:
                _, loss = model(x, y)
                total += loss.double().item()
    finally:
        model.train(was_training)
    return total / len(batches)


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
        (their loss and increase are NaN)}.
    """
    cfg = model.config
    device = next(model.parameters()).device
    base = torch.ones(cfg.n_layer, cfg.n_head) if base_mask is None else base_mask.float().cpu()
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
    p = argparse.ArgumentParser(prog="python -m minigpt.heads",
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
                   help="heatmap image; None = heads.png beside the checkpoint")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--device", default="auto")
    return p


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
        base_mask = parse_mask(args.mask, model_cfg.n_layer, model_cfg.n_head)
    except ValueError as e:
        parser.error(f"argument --mask: {e}")
    out = Path(args.out) if args.out else (path.with_name("heads.png") if path is not None
                                           else Path("heads.png"))
    try:
        from .visualize import image_path_error, plot_head_importance
    except ImportError as e:
        print(f"no heatmap: matplotlib is not available ({e})", file=sys.stderr)
        plot_head_importance = None
    else:
        problem = image_path_error(out)
        if problem:
            parser.error(f"argument --out: {problem}")
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
    pre = [f"L{l}H{h}" for l, h in (base_mask == 0).nonzero().tolist()]
    print(f"minigpt.heads: {source} ({model_cfg.n_layer} layers x {model_cfg.n_head} heads), "
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

        Path(args.json).write_text(json.dumps({
            "checkpoint": source, "split": args.split, "source": corpus.source,
            "tokens": n_tokens, "batches": args.batches, "batch_size": args.batch_size,
            "seed": args.seed, "masked_by_hand": (base_mask == 0).nonzero().tolist(),
            "base_loss": result["base_loss"], "loss": rows(result["loss"]),
            "increase": rows(result["increase"]),
        }, indent=1) + "\n", encoding="utf-8")
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
