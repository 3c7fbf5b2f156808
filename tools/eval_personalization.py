"""Score personalization results: CLIP-T, CLIP-I and DINO, as a table.

The same command as ``visionpeft eval-personalization`` (code: ``visionpeft/cli/eval_personalization.py``);
``--help`` lists its options.
"""

import sys

from visionpeft.cli.common import run
from visionpeft.cli.eval_personalization import main

if __name__ == "__main__":
    sys.exit(run(main))
