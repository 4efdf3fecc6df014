"""What the experiments share: a training run that stays quiet, the check of their paths, and
the writing of their results (results.json, results.md, a picture)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from minigpt.checkpoint import atomic_write_text
from minigpt.runtime import PathError, check_cache_dir, check_dir_target, check_input_file


def train_run(cfg):
    """minigpt.train.loop.train(cfg) without its log lines; returns its TrainResult. A Ctrl-C,
    which train() answers by saving the run and returning, ends the whole experiment rather
    than only this run: KeyboardInterrupt."""
    from minigpt.train import loop

    result = loop.train(cfg, log=lambda message: None)
    if result.interrupted:
        raise KeyboardInterrupt
    return result


def check_paths(p: argparse.ArgumentParser, data: Optional[str], out, out_flag: str) -> None:
    """--data a regular readable file, the output directory writable, the cache usable:
    refused with p.error (exit code 2) before any training starts."""
    try:
        if data is not None:
            check_input_file(data, "--data")
        check_dir_target(out, out_flag)
        check_cache_dir()
    except PathError as e:
        p.error(f"argument {e}")


def write_results(out_dir, results, table: str, plot=None, png_name: str = "") -> None:
    """An experiment's outputs in out_dir: results.json (results), results.md (table) and, with
    plot, png_name drawn by plot(results, path); each file written atomically. Prints the table
    and the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.md", out / "results.json"]
    atomic_write_text(paths[0], table + "\n")
    atomic_write_text(paths[1], json.dumps(results, indent=2) + "\n")
    if plot is not None:
        paths.append(out / png_name)
        plot(results, paths[-1])
    print(table)
    print(", ".join(str(path) for path in paths))


def even_batches(x, y, rows: int) -> list:
    """(x, y) cut into batches of an equal number of rows, the most that divides x's rows and
    is at most rows (so mean_loss's mean of batch means is the mean over tokens)."""
    n = x.shape[0]
    size = max(d for d in range(1, min(rows, n) + 1) if n % d == 0)
    return list(zip(x.split(size), y.split(size)))


def pretrained_arguments(p: argparse.ArgumentParser, data_help: Optional[str] = None) -> None:
    """--init-from (required), and --data (required) where data_help says what text it takes:
    the flags of the experiments on a pretrained model."""
    p.add_argument("--init-from", required=True, metavar="PATH",
                   help="a pretrained model: Hugging Face directory or GGUF file")
    if data_help is not None:
        p.add_argument("--data", required=True, metavar="FILE", help=data_help)


def load_pretrained(init_from: str):
    """(model in eval mode on the CPU, float32; its tokenizer) of a pretrained model: a Hugging
    Face directory or a GGUF file (minigpt.hf.pretrained.pretrained_state).

    Raises:
        minigpt.hf.pretrained.PretrainedError, OSError: what pretrained_state raises.
    """
    from minigpt.hf.pretrained import pretrained_state
    from minigpt.model import GPT
    from minigpt.tokenizer import from_state

    state = pretrained_state(init_from)
    return GPT.from_checkpoint(state).eval(), from_state(state["tokenizer"])


def text_tokens(path, tokenizer, need: int, flag: str = "--data"):
    """The UTF-8 text file at path, tokenized: a 1-d int64 numpy array of at least need tokens.

    Raises:
        PathError: the file is unreadable, not UTF-8, or shorter than need tokens (naming flag,
            the path and the counts).
    """
    import numpy as np

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PathError(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if len(tokens) < need:
        raise PathError(f"{flag} {path}: {len(tokens):,} tokens, this experiment needs "
                        f"{need:,}")
    return tokens
