"""``python -m minigpt <command> [flags]``: every command line of minigpt under one name.

    python -m minigpt train --max-iters 200        # the same as python train.py
    python -m minigpt sample --prompt "ROMEO:"     # the same as python sample.py
    python -m minigpt profile --help               # and so on: `python -m minigpt` lists them

Each command is the ``main(argv)`` of one module, which also runs alone (``python -m <module>``)
and, for the first five, as an installed console script (``minigpt-train``, ...).
"""

from __future__ import annotations

import importlib
import sys
from typing import Dict, List, Optional, Tuple

# command -> (module whose main(argv) runs it, what it does)
COMMANDS: Dict[str, Tuple[str, str]] = {
    "train": ("minigpt.cli.train", "train a model on a text corpus (python train.py)"),
    "sample": ("minigpt.cli.sample", "generate text from a checkpoint or a pretrained model"),
    "profile": ("minigpt.bench.profile", "time attention backends against SDPA on this machine"),
    "bench-generate": ("minigpt.bench.generate", "generation speed with and without the KV cache"),
    "heads": ("minigpt.analysis.heads", "head importance and head pruning of a checkpoint"),
    "plot": ("minigpt.analysis.curves", "training curves of a run directory as a picture"),
    "export": ("minigpt.hf.export", "a checkpoint as a Hugging Face directory or safetensors"),
    "experiments": ("minigpt.experiments", "the experiments: ablation, positions, window, ..."),
    "data": ("minigpt.train.data", "fetch and tokenize a corpus into the cache"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())
    return (f"usage: python -m minigpt <command> [flags]   (python -m minigpt <command> --help)\n\n"
            f"commands:\n{rows}\n")


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``argv[0]`` as a command with the flags that follow; exit code 2 for an unknown one."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)  # no command: an error
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"minigpt: error: unknown command {name!r}; choose from {', '.join(COMMANDS)} "
              f"(see python -m minigpt --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)
