"""Adapter arithmetic: combine, resize, extract or inspect LoRA adapters.

The same command as ``visionpeft adapters`` (code: ``visionpeft/cli/adapters.py``); ``--help`` lists its options.
"""

import sys

from visionpeft.cli.adapters import main
from visionpeft.cli.common import run

if __name__ == "__main__":
    sys.exit(run(main))
