"""Evaluate a run as its task does: ``python tools/eval.py RUN_DIR [--checkpoint NAME] [options]``.

The same command as ``visionpeft eval`` (code: ``visionpeft/cli/eval.py``); ``--help`` lists its options.
"""

import sys

from visionpeft.cli.common import run
from visionpeft.cli.eval import main

if __name__ == "__main__":
    sys.exit(run(main))
