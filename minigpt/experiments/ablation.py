"""``python -m minigpt experiments ablation``: each training option of the default on and off.

Trains the default model once as configured and once with each option turned back (or, for
options the default leaves off, turned on), every run with the same seed, data and wall-clock
budget (TrainConfig.max_time: the schedule runs on the fraction of the budget used, so every
run finishes its schedule), one after another in this process. Prints a Markdown table of the
final validation loss, the steps done and the training throughput, and writes the same as JSON.
Compare rows of one run of the command only: timings from different machines or moments are not
comparable.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

from minigpt.train.config import TrainConfig, apply_overrides, default_settings
from minigpt.experiments.common import check_paths, train_run, write_results

HELP = "each training option on and off at a fixed wall time"

# name -> (what changes against the default, overrides of TrainConfig fields). The default
# turns on Muon (Jordan et al. 2024), QK-norm (Henry et al. 2020), a 30-step warmup and the
# warmup-stable-decay schedule (Hu et al. 2024; Hagele et al. 2024) with momentum 0.9,
# shuffled passes over the corpus and 256-token windows after a sequence-length warmup (Li et
# al. 2022), and evaluates the weights' moving average; the levers of the modded-nanogpt
# speedrun are off.
ABLATIONS: Dict[str, tuple] = {
    "default": ("the default run", {}),
    "adamw": ("AdamW for every parameter instead of Muon for the hidden matrices",
              {"optimizer": "adamw"}),
    "no_qk_norm": ("no QK-norm", {"model": {"qk_norm": False}}),
    "attn_gate": ("gated attention: each head's output times 2 sigmoid(x . w_h) (Qiu et al. "
                  "2025)", {"model": {"attn_gate": True}}),
    "cosine": ("cosine decay instead of warmup-stable-decay", {"lr_schedule": "cosine"}),
    "warmup_100": ("100 warmup steps instead of 30", {"warmup_iters": 100}),
    "momentum_0.95": ("Muon momentum 0.95 (torch's default) instead of 0.9",
                      {"muon_momentum": 0.95}),
    "no_muon_wd": ("no weight decay on Muon's matrices instead of 0.02 (decoupled)",
                   {"muon_weight_decay": 0.0}),
    "relu2": ("ReLU^2 MLP instead of GELU (So et al. 2021)", {"model": {"activation": "relu2"}}),
    "untied_zero_init": ("untied output head, residual projections and head zero-initialised",
                         {"model": {"tie_embeddings": False, "zero_init_proj": True}}),
    "lr_2e-3": ("peak learning rate 2e-3 (Muon 0.02) instead of 3e-3 (Muon 0.03)",
                {"learning_rate": 2e-3}),
    "float32": ("float32 instead of bf16 autocast (dtype auto on a CPU with bf16 "
                "instructions)", {"dtype": "float32"}),
    "no_ema": ("the trained weights evaluated instead of their moving average (decay 0.95)",
               {"ema_decay": 0.0}),
    "data_random": ("windows at random tokens, with replacement (nanoGPT's), instead of "
                    "shuffled passes over the corpus", {"data_order": "random"}),
    "value_embeds": ("value embeddings, 2 tables mixed into the values of layers 0, 1 and 2, 3 "
                     "(modded-nanogpt)", {"model": {"value_embeds": 2}}),
    "unet_skips": ("U-net skips from blocks 0, 1 to blocks 3, 2 (modded-nanogpt)",
                   {"model": {"unet_skips": True}}),
    "softcap_15": ("logits soft-capped at 15 (Gemma 2; modded-nanogpt)",
                   {"model": {"logit_softcap": 15.0}}),
    "block_64": ("64-token windows in batches of 32 (nanoGPT's CPU recipe's) from the first step "
                 "instead of 256 x 8 after the sequence-length warmup",
                 {"model": {"block_size": 64}, "batch_size": 32, "seq_warmup": None}),
    "no_seq_warmup": ("256 x 8 from the first step instead of the sequence-length warmup (100 "
                      "steps of 24 x 32, then 100 of 24 x 64)", {"seq_warmup": None}),
    "batch_ramp": ("batch size ramped from 2 to 8 sequences over the first 300 steps, instead "
                   "of the sequence-length warmup",
                   {"batch_size_start": 2, "ramp_iters": 300, "seq_warmup": None}),
    "seq_ramp": ("sequence length ramped from 64 to 256 tokens over the first 300 steps, "
                 "instead of the sequence-length warmup",
                 {"block_size_start": 64, "ramp_iters": 300, "seq_warmup": None}),
    "compile": ("torch.compile of the model (its compile time inside the budget)",
                {"compile": True}),
    "previous_default": ("the default before Muon: AdamW, cosine, 100 warmup steps, no QK-norm, "
                         "float32, random windows, no EMA, 64 x 32, no sequence-length warmup",
                         {"optimizer": "adamw", "lr_schedule": "cosine", "warmup_iters": 100,
                          "learning_rate": 2e-3, "dtype": "float32", "data_order": "random",
                          "ema_decay": 0.0, "batch_size": 32, "seq_warmup": None,
                          "model": {"qk_norm": False, "block_size": 64}}),
}


def ablation(max_time: float, out_dir: str, data: Optional[str], names: List[str],
             log=print) -> List[dict]:
    """Train each named variant of the default for max_time seconds; return one row per run
    (name, change, final_val_loss, iters, tokens_per_s, wall_time_s)."""
    base = default_settings()
    rows = []
    # A short unreported run first: the process's first training pays one-time costs (loading
    # the kernels, the allocator and the thread pool warming up) that would fall on one row.
    warm = replace(TrainConfig.from_dict(base), data=data, max_time=min(5.0, max_time),
                   max_iters=10**9, eval_interval=10**9, progress=False, overwrite=True,
                   out_dir=str(Path(out_dir) / "_warmup"))
    train_run(warm)
    shutil.rmtree(warm.out_dir, ignore_errors=True)
    for name in names:
        change, overrides = ABLATIONS[name]
        settings = apply_overrides(base, overrides)
        cfg = TrainConfig.from_dict(settings)
        cfg = replace(cfg, data=data, out_dir=str(Path(out_dir) / name), max_time=max_time,
                      max_iters=10**9, eval_interval=100, progress=False, overwrite=True)
        result = train_run(cfg)
        row = dict(name=name, change=change, final_val_loss=round(result.final_val_loss, 4),
                   iters=result.iters, tokens_per_s=round(result.tokens_per_s),
                   wall_time_s=round(result.wall_time_s, 1))
        log(f"{name}: val {row['final_val_loss']:.4f} after {row['iters']} steps, "
            f"{row['tokens_per_s']:,} tokens/s")
        rows.append(row)
    return rows


def markdown(rows: List[dict], max_time: float) -> str:
    """The rows as a Markdown table, with the change in loss against the "default" row."""
    ref = next((r["final_val_loss"] for r in rows if r["name"] == "default"), None)
    lines = [f"| run | change | val loss at {max_time:g} s | vs default | steps | tokens/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        delta = "" if ref is None or r["name"] == "default" else f"{r['final_val_loss'] - ref:+.4f}"
        lines.append(f"| `{r['name']}` | {r['change']} | {r['final_val_loss']:.4f} | {delta} | "
                     f"{r['iters']} | {r['tokens_per_s']:,} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser, quick: bool = False) -> None:
    """The flags of ``experiments ablation`` (it has no --quick; quick is ignored)."""
    p.add_argument("--max-time", type=float, default=60.0, help="wall-clock seconds per run")
    p.add_argument("--runs", nargs="+", choices=list(ABLATIONS), default=list(ABLATIONS),
                   help="which variants (ABLATIONS)")
    p.add_argument("--data", default=None,
                   help="UTF-8 text file; None: tiny Shakespeare")
    p.add_argument("--out-dir", default="runs/ablation",
                   help="parent of each run's directory; results.json and results.md go here")


def run(p: argparse.ArgumentParser, args) -> int:
    """Check the paths and --max-time, train every variant, write the results."""
    check_paths(p, args.data, args.out_dir, "--out-dir")
    if args.max_time <= 0:
        p.error(f"argument --max-time: must be > 0, got {args.max_time}")
    rows = ablation(args.max_time, args.out_dir, args.data, args.runs)
    write_results(args.out_dir, rows, markdown(rows, args.max_time))
    return 0
