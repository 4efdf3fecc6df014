"""``python -m minigpt <command>``: see ``minigpt.cli``."""

import sys

from minigpt.cli import main

sys.exit(main())
