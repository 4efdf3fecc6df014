"""``python -m minigpt.experiments <experiment>``: see ``minigpt.experiments``."""

import sys

from minigpt.experiments import main

sys.exit(main())
