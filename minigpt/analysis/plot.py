"""Plot a training run's curves from its metrics log.

    python -m minigpt plot out/                     # reads out/metrics.jsonl, writes out/curves.png
    python -m minigpt plot out/metrics.jsonl --out curves.png

Train and val loss (top) and the learning rate (bottom) against iterations, from the rows that
minigpt.train.loop writes at each evaluation. train.py writes the same picture when it finishes.
Exit codes: 0 done, 2 bad input (no log, no evaluation rows).
"""

from __future__ import annotations

import sys
from pathlib import Path

from minigpt.runtime import ArgumentParser, cli_main


def build_parser() -> ArgumentParser:
    """The command line of `python -m minigpt plot` (--help shows each flag's default)."""
    parser = ArgumentParser(prog="python -m minigpt plot",
                            description="Plot loss and learning-rate curves from a training "
                                        "run's metrics.jsonl.")
    parser.add_argument("run", type=Path, help="an out_dir holding metrics.jsonl, or the file")
    parser.add_argument("--out", type=Path, default=None,
                        help="output image, its format from the suffix (.png, .pdf, .svg); "
                             "None = curves.png beside metrics.jsonl")
    return parser


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from minigpt.analysis.curves import plot_metrics_file

    try:
        path = plot_metrics_file(args.run, args.out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
