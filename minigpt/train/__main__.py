"""``python -m minigpt.train``: the same command as ``python train.py``."""

import sys

from minigpt.cli.train import main

sys.exit(main())
