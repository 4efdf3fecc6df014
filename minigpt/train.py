"""Train a minigpt model.

    python train.py                                   # preset shakespeare_char, CPU-sized
    python train.py --preset shakespeare              # GPT-2 BPE tokens
    python train.py --data my.txt --max-iters 500     # any UTF-8 text file
    python train.py --config run.toml --seed 2        # settings from a file, flags override it
    python train.py --resume                          # continue from out/ckpt.pt
    python train.py --init-from DIR --data my.txt     # fine-tune a GPT-2 or Llama-family model
    torchrun --nproc_per_node=2 train.py              # DistributedDataParallel

The same command line is `minigpt-train` (installed) and `python -m minigpt.train`.

Every field of TrainConfig and of its model (GPTConfig) is a flag, generated from the dataclasses
with the field's comment as its help: one place per setting. Settings are resolved in this
order, each overriding the one before: TrainConfig's defaults, --preset, --config FILE (TOML or
JSON, nested like config.json: top-level TrainConfig fields and a [model] table), then flags.
With --resume the checkpoint's saved settings replace the defaults and the preset, and the
model's shape and tokenizer cannot change. With --init-from (a Hugging Face model directory or
hub name) the preset defaults to "finetune", and the model's shape and tokenizer are the
pretrained model's: of the model flags only --block-size (at most the model's context),
--dropout and --attn-backend apply, and the others are refused. The resolved settings are written to
out_dir/config.json (usable as --config). The loss curves are drawn to out_dir/curves.png when
training ends.

Exit codes: 0 done (or interrupted and saved), 1 training failed, 2 bad input (arguments, data,
checkpoint, device, a run directory in use or holding another run).

argparse with a small generator rather than jsonargparse (which litgpt uses): the flags keep
their plain names (--n-layer rather than --model.n_layer), and the package needs no further
dependency for its command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Optional, Tuple

from .attention import BACKENDS
from .checkpoint import CheckpointError, load_checkpoint
from .config import (PRESETS, ConfigError, GPTConfig, TrainConfig, apply_overrides,
                     default_settings, field_help, fixed_on_resume)
from .data import DataError
from .pretrained import PretrainedError
from .rundir import RunDirError
from .runtime import DTYPES, DeviceError, Distributed
from .tokenizer import TOKENIZERS
from .training import NonFiniteLossError, train

# Flags with a fixed set of values: argparse lists them in --help and rejects others.
_CHOICES = {"tokenizer": TOKENIZERS, "attn_backend": BACKENDS, "dtype": DTYPES,
            "activation": GPTConfig.ACTIVATIONS, "pos_embedding": GPTConfig.POS_EMBEDDINGS,
            "norm": GPTConfig.NORMS, "mlp": GPTConfig.MLPS}
# GPTConfig fields that are not flags: the vocabulary size follows from the tokenizer.
_NOT_FLAGS = {"vocab_size", "rope_scaling"}  # rope_scaling comes with a pretrained model


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _ints(text: str) -> Tuple[int, ...]:
    """A comma-separated list of ints ("4,2,4") as a tuple, for fields typed Tuple[int, ...]."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, e.g. 4,2,4; got "
                                         f"{text!r}") from None


def _add_fields(group, cls, defaults: dict) -> None:
    """One flag per field of cls, typed from its annotation, its help from its comment."""
    hints = typing.get_type_hints(cls)
    docs = field_help(cls)
    for f in fields(cls):
        if f.name in _NOT_FLAGS or f.name == "model":
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        help_text = (f"{docs.get(f.name, '')} (default: {defaults[f.name]})"
                     .replace("%", "%%"))
        if kind is bool:
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        elif typing.get_origin(kind) is tuple:
            group.add_argument(_flag(f.name), dest=f.name, type=_ints, default=None,
                               help=help_text, metavar="N,N,...")
        else:
            group.add_argument(_flag(f.name), dest=f.name, type=kind, default=None,
                               choices=_CHOICES.get(f.name), help=help_text,
                               metavar=None if f.name in _CHOICES else kind.__name__.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0],
        epilog="Settings resolve as defaults < --preset < --config < flags; with --resume, the "
               "checkpoint's settings replace defaults and preset.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="named overrides of the defaults (default: shakespeare_char; "
                             "finetune with --init-from)")
    parser.add_argument("--config", type=Path, metavar="FILE", default=None,
                        help="TOML or JSON file of settings, nested like out_dir/config.json; "
                             "flags override it (default: None)")
    defaults = default_settings()
    _add_fields(parser.add_argument_group("training (TrainConfig)"), TrainConfig, defaults)
    _add_fields(parser.add_argument_group("model (GPTConfig; the shape is fixed on --resume)"),
                GPTConfig, defaults["model"])
    return parser


def read_config_file(path: Path) -> dict:
    """The settings in a TOML (.toml) or JSON (.json) file, as a dict.

    Raises:
        ValueError: another suffix, or a file that does not parse (the message says where).
        OSError: the file cannot be read.
    """
    if path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        with open(path, "rb") as fh:
            try:
                return tomllib.load(fh)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: {e}") from None
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: {e}") from None
    raise ValueError(f"{path}: a config file must be .toml or .json")


def resolve_config(argv=None) -> Tuple[TrainConfig, Optional[dict]]:
    """Parse flags into a TrainConfig (see the module's docstring for the order), and the
    checkpoint when resuming (read once here; train() takes it). Errors exit through
    argparse (status 2) naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = {k: v for k, v in vars(args).items()
                if v is not None and k not in ("preset", "config")}
    from_file = {}
    if args.config is not None:
        try:
            from_file = read_config_file(args.config)
        except (OSError, ValueError) as e:
            parser.error(f"argument --config: {e}")
    overrides = apply_overrides(from_file, explicit)

    state = None
    preset = args.preset or ("finetune" if overrides.get("init_from") else "shakespeare_char")
    base = apply_overrides(default_settings(), PRESETS[preset])
    if overrides.get("init_from") and not overrides.get("resume"):
        for name in _fixed_by_pretrained(explicit):
            parser.error(f"argument {_flag(name)}: the model comes from --init-from "
                         f"{overrides['init_from']}: its shape and tokenizer are its own "
                         f"(only --block-size, --dropout and --attn-backend apply)")
    if overrides.get("resume"):
        out_dir = Path(overrides.get("out_dir", base["out_dir"]))
        try:
            state = load_checkpoint(out_dir / "ckpt.pt")
        except CheckpointError as e:
            parser.error(f"argument --resume: {e}")
        base = TrainConfig.from_saved(state.get("train_config", {})).to_dict()
        flat_base = {**base, **base["model"]}
        flat_new = {**overrides, **overrides["model"]}
        for name in fixed_on_resume():
            if name in flat_new and flat_new[name] != flat_base[name]:
                parser.error(f"argument {_flag(name)}: the checkpoint's model has "
                             f"{name}={flat_base[name]!r}; a resumed run cannot change it to "
                             f"{flat_new[name]!r}")
    try:
        cfg = TrainConfig.from_dict(apply_overrides(base, overrides))
    except ConfigError as e:
        source = f"--config {args.config}: " if e.name not in explicit and from_file else ""
        parser.error(f"argument {_flag(e.name)}: {source}{e.reason}")
    return cfg, state


def _fixed_by_pretrained(flags: dict) -> list:
    """The flags given that a pretrained model fixes: the model's fields but block_size and
    GPTConfig.TUNABLE, and the tokenizer. (A --config file's model table, such as a fine-tuning
    run's config.json, gives way to the pretrained model's without complaint.)"""
    model_names = {f.name for f in fields(GPTConfig)}
    free = set(GPTConfig.TUNABLE) | {"block_size"}
    return [name for name in flags
            if (name in model_names and name not in free) or name == "tokenizer"]


def parse_config(argv=None) -> TrainConfig:
    """The TrainConfig of a command line (resolve_config without the checkpoint)."""
    return resolve_config(argv)[0]


def draw_curves(cfg: TrainConfig, log=print) -> Optional[Path]:
    """Draw out_dir/metrics.jsonl to out_dir/curves.png; log where, or why not (matplotlib
    missing, no evaluations): a plot never fails a finished run."""
    try:
        from .visualize import plot_metrics_file

        path = plot_metrics_file(cfg.out_dir, train_config=cfg.to_dict())
    except ImportError as e:  # matplotlib is optional at run time
        log(f"minigpt: no loss-curve plot (matplotlib is not available: {e})")
    except (OSError, ValueError) as e:
        log(f"minigpt: no loss-curve plot ({e})")
    else:
        log(f"minigpt: loss curves in {path}")
        return path
    return None


def main(argv=None) -> int:
    cfg, state = resolve_config(argv)
    try:
        train(cfg, resume_state=state)
    except (DataError, CheckpointError, DeviceError, RunDirError, ConfigError,
            PretrainedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if Distributed.is_master_process():
        draw_curves(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
