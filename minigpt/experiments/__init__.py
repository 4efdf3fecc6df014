"""Experiments on minigpt's models, each one command that prints a table and writes its results.

    python -m minigpt experiments ablation --max-time 60     # ablation.py: each training
                                                            # option of the default on and off
    python -m minigpt experiments positions --quick          # positions.py: position encodings
                                                            # evaluated at 1x-8x their context
    python -m minigpt experiments window --quick             # window.py: a sliding window's
                                                            # cost and loss
    python -m minigpt experiments coreference --init-from M  # coreference.py: does attention
                                                            # resolve "it"?
    python -m minigpt experiments prune --init-from M --data F  # pruning.py: 10-50% of a
                                                            # pretrained model's heads removed
    python -m minigpt experiments length --init-from M --data F  # length.py: loss against
                                                            # position, past the context

Each module holds its experiment as functions returning plain rows, a Markdown table,
``add_arguments(parser)`` for its flags and ``run(parser, args)``; common.py what they share.
The training runs are minigpt.train.loop's train().
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict

from minigpt.runtime import ArgumentParser, cli_main

# experiment -> its module
EXPERIMENTS: Dict[str, str] = {
    "ablation": "minigpt.experiments.ablation",
    "positions": "minigpt.experiments.positions",
    "window": "minigpt.experiments.window",
    "coreference": "minigpt.experiments.coreference",
    "prune": "minigpt.experiments.pruning",
    "length": "minigpt.experiments.length",
}


def build_parser(quick: bool = False) -> argparse.ArgumentParser:
    """The command line, one subcommand per experiment; quick: the defaults that --quick
    gives (the flags say which)."""
    p = ArgumentParser(prog="python -m minigpt experiments",
                       description="Experiments on minigpt's own model.")
    sub = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT",
                           help=", ".join(EXPERIMENTS))
    for name, module_name in EXPERIMENTS.items():
        module = importlib.import_module(module_name)
        q = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(q, quick=quick)
        q.set_defaults(experiment_parser=q)  # run() reports bad values with its p.error
    return p


@cli_main
def main(argv=None) -> int:
    """Run one experiment. Bad input (data, paths, device, settings) ends in one line with exit
    code 2, checked before the first run starts."""
    from minigpt.config import ConfigError
    from minigpt.runtime import DeviceError, PathError, os_error_message
    from minigpt.train.data import DataError
    from minigpt.train.rundir import RunDirError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "quick", False):  # the flags not given take --quick's defaults
        args = build_parser(quick=True).parse_args(argv)
    module = importlib.import_module(EXPERIMENTS[args.experiment])
    try:
        return module.run(args.experiment_parser, args)
    except (DataError, PathError, RunDirError, DeviceError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 2
