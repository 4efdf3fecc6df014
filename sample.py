"""The sample command line; see minigpt/sample.py (also installed as minigpt-sample)."""

import sys

from minigpt.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
