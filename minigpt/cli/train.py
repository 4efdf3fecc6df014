"""Train a minigpt model.

    python train.py                                   # preset shakespeare_char, CPU-sized
    python train.py --preset shakespeare              # GPT-2 BPE tokens
    python train.py --data my.txt --max-iters 500     # any UTF-8 text file
    python train.py --config run.toml --seed 2        # settings from a file, flags override it
    python train.py --resume                          # continue from out/ckpt.pt
    python train.py --init-from DIR --data my.txt     # fine-tune a GPT-2 or Llama-family model
    torchrun --nproc_per_node=2 train.py              # DistributedDataParallel

The same command line is `minigpt-train` (installed) and `python -m minigpt train`.

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

Every value of a --config file is checked against its field's declared type before anything
is used (a bool must be true or false, not "false"); an unknown key is named as a key of the
file. --dry-run resolves and checks everything that can be checked without training (the
settings, the run directory, the cache directory, the corpus file, the device, the logger's
package) and prints the resolved settings; it writes nothing. A run checks the same before it
writes anything.

Exit codes: 0 done (or interrupted and saved), 1 training failed (a non-finite loss, the run
directory deleted during the run, out of memory), 2 bad input (arguments, config file, data,
checkpoint, device, a run directory in use or holding another run, a path that cannot be used,
a file system that refused a write: disk full, read-only, permission), 130 a second Ctrl-C.

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

from minigpt.checkpoint import CheckpointError, load_checkpoint
from minigpt.config import ConfigError, GPTConfig
from minigpt.train.config import (PRESETS, TrainConfig, apply_overrides, check_settings,
                                  default_settings, field_help, fixed_on_resume)
from minigpt.train.data import DataError
from minigpt.hf.pretrained import PretrainedError
from minigpt.train.rundir import RunDirError, RunDirLostError
from minigpt.runtime import (ArgumentParser, DeviceError, Distributed, PathError,
                      check_input_file, cli_main, os_error_message, out_of_memory)
from minigpt.train.loop import NonFiniteLossError, check_targets, train

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
    """One flag per field of cls, typed from its annotation (a Literal's values are the
    flag's choices), its help from its comment."""
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
        elif typing.get_origin(kind) is typing.Literal:
            group.add_argument(_flag(f.name), dest=f.name, default=None,
                               choices=typing.get_args(kind), help=help_text)
        else:
            group.add_argument(_flag(f.name), dest=f.name, type=kind, default=None,
                               help=help_text, metavar=kind.__name__.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.HelpFormatter,  # the defaults are written into each help
        epilog="Settings resolve as defaults < --preset < --config < flags; with --resume, the "
               "checkpoint's settings replace defaults and preset.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="named overrides of the defaults (default: shakespeare_char; "
                             "finetune with --init-from)")
    parser.add_argument("--config", type=Path, metavar="FILE", default=None,
                        help="TOML or JSON file of settings, nested like out_dir/config.json; "
                             "flags override it (default: None)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the settings, paths, corpus file, device and logger, print "
                             "the resolved settings and exit without writing anything "
                             "(default: off)")
    defaults = default_settings()
    _add_fields(parser.add_argument_group("training (TrainConfig)"), TrainConfig, defaults)
    _add_fields(parser.add_argument_group("model (GPTConfig; the shape is fixed on --resume)"),
                GPTConfig, defaults["model"])
    return parser


def read_config_file(path: Path) -> dict:
    """The settings in a TOML (.toml) or JSON (.json) file, as a dict.

    Raises:
        ValueError: another suffix, a file that does not parse (the message says where), or
            not a regular readable file (a FIFO is refused: reading it could block).
        OSError: the file cannot be read.
    """
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"{path}: a config file must be .toml or .json")
    check_input_file(path, "config file")
    if path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        with open(path, "rb") as fh:
            try:
                return tomllib.load(fh)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
                raise ValueError(f"{path}: {e}") from None
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: {e}") from None


def resolve_config(argv=None) -> Tuple[TrainConfig, Optional[dict]]:
    """Parse flags into a TrainConfig (see the module's docstring for the order), and the
    checkpoint when resuming (read once here; train() takes it). Errors exit through
    argparse (status 2) naming the flag."""
    return _resolve(build_parser(), argv)[:2]


def _file_error(parser, path, e: ConfigError, from_file: dict) -> None:
    """Exit 2 with one line naming the --config file and the key (not a flag) at fault."""
    nested = e.owner == "GPTConfig" and e.name in (from_file.get("model") or {})
    key = f"model.{e.name}" if nested else e.name
    if e.name == "settings":
        parser.error(f"argument --config: {path}: the file {e.reason}")
    parser.error(f"argument --config: {path}: key {key} {e.reason}")


def _from_file(e: ConfigError, from_file: dict, explicit: dict) -> bool:
    """Whether the setting a ConfigError names came from the --config file, not a flag."""
    if e.name in explicit:
        return False
    return e.name in from_file or e.name in (from_file.get("model") or {}) or e.name in (
        "settings", "model")


def _resolve(parser, argv):
    args = parser.parse_args(argv)
    explicit = {k: v for k, v in vars(args).items()
                if v is not None and k not in ("preset", "config", "dry_run")}
    from_file = {}
    if args.config is not None:
        try:
            raw = read_config_file(args.config)
        except (OSError, ValueError) as e:
            reason = os_error_message(e) if isinstance(e, OSError) else e
            parser.error(f"argument --config: {reason}")
        try:
            from_file = check_settings(raw)
        except ConfigError as e:
            _file_error(parser, args.config, e, raw if isinstance(raw, dict) else {})
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
        if from_file and _from_file(e, from_file, explicit):
            _file_error(parser, args.config, e, from_file)
        parser.error(f"argument {_flag(e.name)}: {e.reason}")
    return cfg, state, args


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
        from minigpt.analysis.curves import plot_metrics_file

        path = plot_metrics_file(cfg.out_dir, train_config=cfg.to_dict())
    except ImportError as e:  # matplotlib is optional at run time
        log(f"minigpt: no loss-curve plot (matplotlib is not available: {e})")
    except (OSError, ValueError) as e:
        log(f"minigpt: no loss-curve plot ({e})")
    else:
        log(f"minigpt: loss curves in {path}")
        return path
    return None


@cli_main
def main(argv=None) -> int:
    cfg, state, args = _resolve(build_parser(), argv)
    try:
        if args.dry_run:
            check_targets(cfg)
            print(json.dumps(cfg.to_dict(), indent=2))
            print(f"minigpt: settings valid; a run would train into {cfg.out_dir}",
                  file=sys.stderr)
            return 0
        train(cfg, resume_state=state)
    except (DataError, CheckpointError, DeviceError, RunDirError, ConfigError,
            PretrainedError, PathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_message(e)}"
              + ("; the previous checkpoint is kept" if str(e.filename).endswith(".pt") else ""),
              file=sys.stderr)
        return 2
    except (NonFiniteLossError, RunDirLostError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"error: out of memory ({first}); try a smaller batch_size, block_size or "
              f"model", file=sys.stderr)
        return 1
    if Distributed.is_master_process():
        draw_curves(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
