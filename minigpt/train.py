"""Train a minigpt model.

    python train.py                                   # preset shakespeare_char, CPU-sized
    python train.py --preset shakespeare              # GPT-2 BPE tokens
    python train.py --data my.txt --max-iters 500     # any UTF-8 text file
    python train.py --resume                          # continue from out/ckpt.pt
    torchrun --nproc_per_node=2 train.py              # DistributedDataParallel

The same command line is `minigpt-train` (installed) and `python -m minigpt.train`.
Every TrainConfig field is a flag (--n-layer, --learning-rate, ...); a preset sets defaults that
flags override. Exit codes: 0 done (or interrupted and saved), 1 training failed, 2 bad input
(arguments, data, checkpoint, device).
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import fields
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint
from .data import DataError
from .rundir import RunDirError
from .runtime import DTYPES, DeviceError
from .training import PRESETS, NonFiniteLossError, TrainConfig, train

# Fields that must be > 0, >= 0, or in a set; checked after parsing with argparse's own errors.
_POSITIVE = {"n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "batch_size", "grad_accum",
             "learning_rate", "eval_interval", "eval_iters", "log_interval", "rope_theta",
             "lr_decay_iters"}
_NON_NEGATIVE = {"max_iters", "min_lr", "warmup_iters", "weight_decay", "grad_clip",
                 "skip_nonfinite"}
_CHOICES = {"tokenizer": ("char", "gpt2"), "attn_backend": ("ext", "sdpa", "naive"),
            "dtype": DTYPES}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="shakespeare_char",
                        help="named set of defaults")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None,
                                choices=_CHOICES.get(f.name))
    return parser


# Fields that fix the model's shape: a resumed run cannot change them.
_MODEL_FIELDS = ("tokenizer", "n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "bias",
                 "rope_theta")


def parse_config(argv=None) -> TrainConfig:
    """Parse flags into a TrainConfig: preset defaults, then explicit flags. With --resume, the
    checkpoint's own settings replace the preset, so a resumed run continues as it began."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = {k: v for k, v in vars(args).items() if v is not None and k != "preset"}
    values = dict(PRESETS[args.preset])
    if explicit.get("resume"):
        saved = _saved_config(parser, explicit)
        for name in _MODEL_FIELDS:
            if name in explicit and explicit[name] != saved.get(name):
                parser.error(f"argument --{name.replace('_', '-')}: the checkpoint's model has "
                             f"{name}={saved.get(name)!r}; a resumed run cannot change it to "
                             f"{explicit[name]!r}")
        values = saved
    values.update(explicit)
    cfg = TrainConfig(**values)
    for name in _POSITIVE:
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            parser.error(f"argument --{name.replace('_', '-')}: must be > 0, got {value}")
    for name in _NON_NEGATIVE:
        if not getattr(cfg, name) >= 0:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= 0, got "
                         f"{getattr(cfg, name)}")
    if not 0 <= cfg.dropout < 1:
        parser.error(f"argument --dropout: must be in [0, 1), got {cfg.dropout}")
    if cfg.min_lr > cfg.learning_rate:
        parser.error(f"argument --min-lr: must not exceed --learning-rate ({cfg.learning_rate}),"
                     f" got {cfg.min_lr}")
    for b, name in ((cfg.beta1, "beta1"), (cfg.beta2, "beta2")):
        if not 0 <= b < 1:
            parser.error(f"argument --{name}: must be in [0, 1), got {b}")
    if cfg.n_embd % cfg.n_head:
        parser.error(f"argument --n-embd: must be divisible by --n-head ({cfg.n_head}), got "
                     f"{cfg.n_embd}")
    return cfg


def _saved_config(parser, explicit) -> dict:
    path = Path(explicit.get("out_dir", TrainConfig.out_dir)) / "ckpt.pt"
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        parser.error(f"argument --resume: {e}")
    known = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in state.get("train_config", {}).items() if k in known}


def main(argv=None) -> int:
    cfg = parse_config(argv)
    try:
        result = train(cfg)
    except (DataError, CheckpointError, DeviceError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
