"""Apply a run to new inputs: ``python tools/predict.py RUN_DIR [INPUT ...] --out OUT [options]``.

The same command as ``visionpeft predict`` (code: ``visionpeft/cli/predict.py``); ``--help`` lists its options.
"""

import sys

from visionpeft.cli.common import run
from visionpeft.cli.predict import main

if __name__ == "__main__":
    sys.exit(run(main))
