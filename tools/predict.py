"""Segment new images with a trained run: ``python tools/predict.py RUN_DIR img1.jpg ... --out masks/``.

The same command as ``visionpeft predict`` (code: ``visionpeft/cli/predict.py``); ``--help`` lists its options.
"""

import sys

from visionpeft.cli.common import run
from visionpeft.cli.predict import main

if __name__ == "__main__":
    sys.exit(run(main))
