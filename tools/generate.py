"""Sample a prompt x seed grid from a diffusers pipeline with any combination of saved adapters.

The same command as ``visionpeft generate`` (code: ``visionpeft/cli/generate.py``); ``--help`` lists its options.
"""

import sys

from visionpeft.cli.common import run
from visionpeft.cli.generate import main

if __name__ == "__main__":
    sys.exit(run(main))
