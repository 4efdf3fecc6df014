"""The train command line; see minigpt/train.py (also installed as minigpt-train)."""

import sys

from minigpt.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
