"""Evaluate a trained adapter: ``python tools/eval.py RUN_DIR [--checkpoint best|last] [--split test]``.

The same command as ``visionpeft eval`` (code in ``visionpeft/cli/eval.py``); run ``--help`` for its options.
"""

import sys

from visionpeft.cli.common import run
from visionpeft.cli.eval import main

if __name__ == "__main__":
    sys.exit(run(main))
