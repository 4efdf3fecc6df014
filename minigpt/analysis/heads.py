"""`python -m minigpt heads`: head importance and head pruning of a checkpoint.

    python -m minigpt heads --checkpoint out/ckpt.pt
    python -m minigpt heads --checkpoint out/ --mask 3:1 --mask 0:2 --json heads.json
    python -m minigpt heads --init-from DIR --data my.txt   # a pretrained GPT-2 or Llama
    python -m minigpt heads --checkpoint out/ --prune 6 --out pruned/ --finetune-iters 100

Head importance (minigpt.analysis.importance): the loss on a fixed set of batches with every
head on, then with each head masked alone; the difference is that head's importance (the
single-head ablation of Michel et al. 2019, "Are Sixteen Heads Really Better than One?").
--mask L:H masks heads by hand first: the base loss and every row are then measured with those
heads already removed. Prints a layers x heads grid and a table sorted by increase (nats/token),
and writes a heatmap (--out).

--prune N --out DIR (minigpt.analysis.prune): remove N query heads greedily, re-measuring the
loss after every removal, and write the smaller model to DIR/ckpt.pt (GPT.from_checkpoint,
sample.py and train.py --resume read it). Reported: parameters, forward tokens/s (before and
after, timed alternately on one batch, median of --timing-runs passes after 2 warmup) and the
loss before and after; --finetune-iters K then trains the pruned checkpoint K steps with
minigpt.train.loop (the checkpoint's settings, at its final learning rate) and reports the loss
after that. Also writes the loss-against-heads-removed curve (--prune-plot, default
DIR/prune.png) and --json. The loss is measured on the same fixed batches throughout.

Exit codes: 0 done, 2 bad input (arguments, checkpoint, data).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from minigpt.analysis.importance import (evaluate_loss, format_grid, format_table,
                                         head_importance, parse_mask)
from minigpt.analysis.prune import (finetune, forward_throughput, greedy_prune, max_prunable,
                                    prune_heads, pruned_checkpoint)
from minigpt.checkpoint import (CheckpointError, atomic_write_text, checkpoint_file,
                                load_checkpoint, save_checkpoint)
from minigpt.config import ConfigError
from minigpt.hf.pretrained import add_model_source_args, pretrained_state
from minigpt.model import GPT
from minigpt.runtime import (ArgumentParser, DeviceError, PathError, check_file_target, cli_main,
                             pick_device)
from minigpt.tokenizer import from_state
from minigpt.train.data import BatchSampler, DataError, load_corpus
from minigpt.train.rundir import RunDirError


def build_parser() -> ArgumentParser:
    """The command line of `python -m minigpt heads` (--help shows each flag's default)."""
    p = ArgumentParser(prog="python -m minigpt heads",
                       description="Loss increase when each attention head is masked (Michel et "
                                   "al. 2019), and greedy head pruning (--prune).")
    add_model_source_args(p, "; needs --data")
    p.add_argument("--data", default=None,
                   help="UTF-8 text file to evaluate on, tokenized with the model's "
                        "tokenizer; None = the checkpoint's training data")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per sequence; None = the model's block_size (with "
                        "--init-from, at most 256)")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="which split of the corpus to measure the loss on")
    p.add_argument("--batches", type=int, default=20, help="fixed batches to evaluate on")
    p.add_argument("--batch-size", type=int, default=12, help="sequences per batch")
    p.add_argument("--seed", type=int, default=1337, help="seed of the batch positions")
    p.add_argument("--mask", action="append", default=[], metavar="L:H",
                   help="mask this head (layer:head) in every measurement; repeatable")
    p.add_argument("--out", default=None,
                   help="heatmap image; None = heads.png beside the checkpoint. With --prune: "
                        "the directory of the pruned checkpoint (required)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--device", default="auto",
                   help='"auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps"')
    prune = p.add_argument_group("pruning")
    prune.add_argument("--prune", type=int, default=None, metavar="N",
                       help="remove the N least important query heads, greedily (re-measured "
                            "after each removal), and write the smaller model to --out; None = "
                            "measure head importance only")
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


def head_name(layer: int, head: int) -> str:
    """A head's short name: L2H1 is head 1 of layer 2."""
    return f"L{layer}H{head}"


def write_json(path, obj) -> None:
    """obj as indented JSON, written atomically (minigpt.checkpoint.atomic_write_text)."""
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """The argument checks that need no model (argparse errors, exit 2)."""
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


def check_prune_args(parser: argparse.ArgumentParser, args) -> None:
    """Argument checks of --prune and its options that need no model (argparse errors, exit 2);
    the limit on --prune is checked once the model is read (check_model_args)."""
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


def load_source(args, path: Optional[Path]):
    """(checkpoint state, its tokenizer, the corpus to measure on) of --checkpoint (path) or
    --init-from. The corpus is --data, else the run's training data, which must give the
    checkpoint's tokenizer.

    Raises:
        CheckpointError, DataError, OSError, ValueError, ImportError: unreadable input.
    """
    state = (pretrained_state(args.init_from) if args.init_from is not None
             else load_checkpoint(path))
    tokenizer = from_state(state["tokenizer"])
    data = args.data if args.data is not None else state.get("train_config", {}).get("data")
    # "char" is rebuilt from the text (and compared below); the others are fixed.
    corpus = load_corpus(data, "char" if tokenizer.name == "char" else tokenizer)
    if args.data is None and corpus.tokenizer.state_dict() != tokenizer.state_dict():
        raise DataError(f"the corpus {corpus.source} does not give the checkpoint's "
                        f"tokenizer (a different text?); pass --data")
    return state, tokenizer, corpus


def check_model_args(parser: argparse.ArgumentParser, args, cfg, path: Optional[Path]):
    """The argument checks that need the model's GPTConfig cfg: --block-size, --mask, --prune
    (ALiBi, the limit, --out apart from the checkpoint, which it creates). Returns (block_size,
    the (n_layer, n_head) gates of --mask, the image path to write)."""
    block_size = args.block_size or (min(256, cfg.block_size) if args.init_from
                                     else cfg.block_size)
    if block_size > cfg.block_size:
        parser.error(f"argument --block-size: the model's context is {cfg.block_size}, "
                     f"got {block_size}")
    try:
        base_mask = parse_mask(args.mask, cfg.n_layer, cfg.n_head, cfg.layer_heads)
    except ValueError as e:
        parser.error(f"argument --mask: {e}")
    if args.prune is None:
        image = Path(args.out) if args.out else (path.with_name("heads.png") if path is not None
                                                 else Path("heads.png"))
        return block_size, base_mask, image
    if cfg.pos_embedding == "alibi":
        parser.error("argument --prune: models with pos_embedding='alibi' cannot be pruned "
                     "(each head's slope depends on its index among n_head)")
    limit = max_prunable(cfg)
    if args.prune > limit:
        counts = [cfg.heads(layer)[0] for layer in range(cfg.n_layer)]
        parser.error(f"argument --prune: at most {limit} heads can be removed (every layer "
                     f"keeps one; heads per layer {counts}), got {args.prune}")
    if path is not None and Path(args.out).resolve() == path.parent.resolve():
        parser.error(f"argument --out: {args.out} holds the checkpoint being pruned; "
                     f"choose another directory")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return block_size, base_mask, Path(args.prune_plot or Path(args.out) / "prune.png")


def load_plotter(parser: argparse.ArgumentParser, args, image: Path):
    """The function that draws this command's picture to image (plot_prune_curve with --prune,
    else plot_head_importance), or None when matplotlib is missing (said on stderr). An image
    path that cannot be written is an argparse error."""
    try:
        from minigpt.analysis.curves import plot_prune_curve
        from minigpt.analysis.pictures import image_path_error, plot_head_importance
    except ImportError as e:
        print(f"no {'plot' if args.prune is not None else 'heatmap'}: matplotlib is not "
              f"available ({e})", file=sys.stderr)
        return None
    problem = image_path_error(image)
    if problem:
        parser.error(f"argument --{'prune-plot' if args.prune is not None else 'out'}: "
                     f"{problem}")
    return plot_prune_curve if args.prune is not None else plot_head_importance


def eval_batches(args, corpus, tokenizer, block_size: int, device: torch.device) -> list:
    """--batches fixed (x, y) int64 (batch_size, block_size) pairs of the --split split, on
    device, at positions drawn with --seed; the text re-encoded with the checkpoint's own
    tokenizer when --data built another char vocabulary.

    Raises:
        DataError: the text has characters the checkpoint's vocabulary lacks, or is too short.
    """
    tokens = corpus.split(args.split)
    if args.data is not None and corpus.tokenizer.state_dict() != tokenizer.state_dict():
        # A char vocabulary is rebuilt from each text: re-encode with the checkpoint's own.
        text = corpus.tokenizer.decode(tokens.tolist())
        try:
            tokens = np.array(tokenizer.encode(text), dtype=np.int64)
        except ValueError as e:
            raise DataError(f"--data {args.data}: {e}") from None
    sampler = BatchSampler(tokens, block_size, args.batch_size, seed=args.seed)
    return [sampler.next(device) for _ in range(args.batches)]


def batches_in_words(args, corpus_source: str, batches) -> str:
    """The batches in words: val split of CORPUS, 20 batches x 12 x 256 tokens = 61,440 tokens
    (seed 1337)."""
    B, T = batches[0][0].shape
    return (f"{args.split} split of {corpus_source}, {len(batches)} batches x {B} x {T} tokens "
            f"= {sum(x.numel() for x, _ in batches):,} tokens (seed {args.seed})")


def run_importance(args, model: GPT, batches, base_mask: torch.Tensor, source: str,
                   corpus_source: str, image: Path, plot_fn) -> int:
    """The importance command: the grid and table of loss increases, the heatmap, the JSON.
    base_mask: the (n_layer, n_head) gates of --mask; plot_fn: plot_head_importance or None."""
    cfg = model.config
    n_tokens = sum(x.numel() for x, _ in batches)
    pre = [head_name(l, h) for l, h in (base_mask == 0).nonzero().tolist()]
    shape = (f"{cfg.n_layer} layers x {cfg.n_head} heads" if cfg.layer_heads is None else
             f"{cfg.n_layer} layers, heads per layer {list(cfg.layer_heads)} (pruned)")
    print(f"minigpt.analysis.heads: {source} ({shape}), "
          f"{batches_in_words(args, corpus_source, batches)}")
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
    if plot_fn is not None:
        title = (f"{args.split} loss increase when one head is masked\n(base {args.split} loss "
                 f"{result['base_loss']:.4f} on {n_tokens:,} tokens"
                 + (f"; masked by hand: {', '.join(pre)})" if pre else ")"))
        plot_fn(result["increase"], image, base_loss=result["base_loss"],
                masked=result["masked"], title=title)
        print(f"\nheatmap: {image}")
    if args.json:
        def rows(t):
            return [[None if v != v else v for v in row] for row in t.tolist()]

        write_json(args.json, {
            "checkpoint": source, "split": args.split, "source": corpus_source,
            "tokens": n_tokens, "batches": args.batches, "batch_size": args.batch_size,
            "seed": args.seed, "masked_by_hand": (base_mask == 0).nonzero().tolist(),
            "base_loss": result["base_loss"], "loss": rows(result["loss"]),
            "increase": rows(result["increase"]),
        })
        print(f"json: {args.json}")
    return 0


def print_prune_steps(result: dict, cfg, split: str) -> None:
    """The table of a greedy_prune result: per step the heads removed, the heads left, the loss
    and its increase, and how many units were measured."""
    print(f"\n{'step':>4} {'removed':>14} {'heads left':>10} {split + ' loss':>9} "
          f"{'increase':>9} {'candidates':>10}")
    left = sum(cfg.heads(layer)[0] for layer in range(cfg.n_layer))
    print(f"{0:>4} {'-':>14} {left:>10} {result['base_loss']:>9.4f} {'':>9} {'':>10}")
    for i, step in enumerate(result["steps"], 1):
        left -= len(step["removed"])
        names = ",".join(head_name(*h) for h in step["removed"])
        print(f"{i:>4} {names:>14} {left:>10} {step['loss']:>9.4f} {step['increase']:>+9.4f} "
              f"{len(step['candidates']):>10}")


def finetune_pruned(args, out_dir: Path, info: dict, device: torch.device):
    """--finetune-iters: train the pruned checkpoint in out_dir (minigpt.analysis.prune.finetune)
    and keep its "pruned" record. Returns (the fine-tuned GPT in eval mode on device, the step
    it reached), or None after printing why training failed."""
    try:
        ft = finetune(out_dir, args.finetune_iters, args.data, args.device,
                      log=lambda msg: print(f"  finetune: {msg}"))
    except (DataError, RunDirError, CheckpointError, ConfigError, DeviceError) as e:
        print(f"error: --finetune-iters: {e}", file=sys.stderr)
        return None
    tuned_state = load_checkpoint(out_dir / "ckpt.pt")
    # Training wrote its own checkpoint: carry over what pruning removed.
    tuned_state["pruned"] = dict(info, finetune_iters=args.finetune_iters)
    save_checkpoint(tuned_state, out_dir / "ckpt.pt")
    print(f"fine-tuned for {args.finetune_iters} steps (to step {ft.iters}); the checkpoint "
          f"in {out_dir} now holds the fine-tuned model")
    return GPT.from_checkpoint(tuned_state).to(device).eval(), ft.iters


def print_prune_summary(split: str, heads: dict, params: dict, speed: dict, losses: dict,
                        how: str) -> None:
    """The before / after / fine-tuned table: heads, parameters, forward tokens/s, loss; and a
    warning when the pruned model's loss is not the masked model's."""
    tuned = losses["finetuned"]
    print(f"\n{'':<22} {'before':>12} {'after':>12}" + (f" {'fine-tuned':>12}" if tuned
                                                          is not None else ""))
    print(f"{'heads':<22} {heads['before']:>12} {heads['after']:>12}")
    print(f"{'parameters':<22} {params['before']:>12,} {params['after']:>12,}")
    print(f"{'tokens/s (forward)':<22} {speed['before']:>12,.0f} {speed['after']:>12,.0f}   "
          f"x{speed['after'] / speed['before']:.2f} ({how})")
    print(f"{split + ' loss':<22} {losses['before']:>12.4f} {losses['after']:>12.4f}"
          + (f" {tuned:>12.4f}" if tuned is not None else ""))
    masked = losses["after_masked"]
    if abs(losses["after"] - masked) > 1e-4 * max(1.0, abs(masked)):
        print(f"warning: the pruned model's loss {losses['after']:.6f} differs from the masked "
              f"model's {masked:.6f}", file=sys.stderr)


def run_prune(args, state: dict, model: GPT, batches, source: str, plot_path: Path,
              plot_fn) -> int:
    """The --prune command: greedy pruning (minigpt.analysis.prune.greedy_prune), the smaller
    model written to args.out, optional fine-tuning, the report (parameters, tokens/s, loss
    before / after / after fine-tuning), the curve (plot_fn: plot_prune_curve or None) and the
    JSON. Returns the exit code."""
    cfg = model.config
    device = next(model.parameters()).device
    out_dir = Path(args.out)

    def progress(step, measured):
        print(f"  step {step}: measured {measured} candidate units", file=sys.stderr)

    result = greedy_prune(cfg, args.prune, lambda g: evaluate_loss(model, batches, g.to(device)),
                          progress=progress)
    print_prune_steps(result, cfg, args.split)
    removed = [h for step in result["steps"] for h in step["removed"]]
    if len(removed) < args.prune:
        print(f"note: stopped after {len(removed)} of {args.prune} heads: every unit left is "
              f"larger than the heads still to remove (grouped-query layers shrink one head per "
              f"key/value group at a time)")
    pruned = prune_heads(model, removed).eval()
    losses = {"before": result["base_loss"], "after": evaluate_loss(pruned, batches),
              "after_masked": result["steps"][-1]["loss"] if result["steps"]
              else result["base_loss"], "finetuned": None}
    x = batches[0][0]
    speed = forward_throughput({"before": model, "after": pruned}, x, runs=args.timing_runs)
    info = {"source": source, "removed": [list(h) for h in removed],
            "layer_heads": list(pruned.config.layer_heads),
            "layer_kv_heads": list(pruned.config.layer_kv_heads),
            "split": args.split, "base_loss": result["base_loss"], "loss": losses["after"]}
    save_checkpoint(pruned_checkpoint(state, pruned, info), out_dir / "ckpt.pt")
    print(f"\npruned checkpoint: {out_dir / 'ckpt.pt'} (heads per layer "
          f"{info['layer_heads']}, key/value heads {info['layer_kv_heads']}; removed "
          f"{', '.join(head_name(*h) for h in removed)})")
    ft_iters = 0
    if args.finetune_iters:
        tuned = finetune_pruned(args, out_dir, info, device)
        if tuned is None:
            return 2
        losses["finetuned"], ft_iters = evaluate_loss(tuned[0], batches), tuned[1]
    how = (f"{x.shape[0]} x {x.shape[1]} tokens per forward, median of {args.timing_runs} "
           f"after 2 warmup, {device}")
    heads = {"before": sum(cfg.heads(l)[0] for l in range(cfg.n_layer)),
             "after": sum(pruned.config.layer_heads)}
    params = {"before": model.num_params(), "after": pruned.num_params()}
    print_prune_summary(args.split, heads, params, speed, losses, how)

    counts = [0]
    for step in result["steps"]:
        counts.append(counts[-1] + len(step["removed"]))
    curve = [result["base_loss"]] + [step["loss"] for step in result["steps"]]
    if plot_fn is not None:
        labels = [",".join(head_name(*h) for h in step["removed"]) for step in result["steps"]]
        plot_fn(counts, curve, plot_path, finetuned=losses["finetuned"], labels=labels,
                title=f"{args.split} loss as heads are removed (greedy; {source})")
        print(f"\nprune curve: {plot_path}")
    if args.json:
        write_json(args.json, {
            "checkpoint": source, "out": str(out_dir), "split": args.split,
            "tokens": sum(b[0].numel() for b in batches), "batches": args.batches,
            "batch_size": args.batch_size, "seed": args.seed, "prune": args.prune,
            "removed": [[list(h) for h in step["removed"]] for step in result["steps"]],
            "heads_removed": counts, "loss_curve": curve,
            "layer_heads": info["layer_heads"], "layer_kv_heads": info["layer_kv_heads"],
            "params": params, "tokens_per_s": speed, "timing": how, "loss": losses,
            "finetune_iters": args.finetune_iters, "finetuned_to_step": ft_iters or None,
        })
        print(f"json: {args.json}")
    return 0


@cli_main
def main(argv=None) -> int:
    """Run `python -m minigpt heads` with argv (default sys.argv[1:]); returns the exit code:
    0 done, 2 bad input (argparse errors exit with 2 too)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    path = None if args.init_from else checkpoint_file(args.checkpoint or "out/ckpt.pt")
    source = args.init_from or str(path)
    try:
        state, tokenizer, corpus = load_source(args, path)
    except (CheckpointError, DataError, OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = GPT.from_checkpoint(state)
    cfg = model.config
    block_size, base_mask, image = check_model_args(parser, args, cfg, path)
    plot_fn = load_plotter(parser, args, image)
    try:
        device = pick_device(args.device)
    except DeviceError as e:
        parser.error(f"argument --device: {e}")
    model.to(device).eval()
    try:
        batches = eval_batches(args, corpus, tokenizer, block_size, device)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.prune is None:
        return run_importance(args, model, batches, base_mask, source, corpus.source, image,
                              plot_fn)
    counts = [cfg.heads(layer)[0] for layer in range(cfg.n_layer)]
    print(f"minigpt.analysis.heads --prune {args.prune}: {source} ({cfg.n_layer} layers, heads "
          f"per layer {counts}), {batches_in_words(args, corpus.source, batches)}")
    return run_prune(args, state, model, batches, source, image, plot_fn)


if __name__ == "__main__":
    sys.exit(main())
