"""Train any task: image classification, personalization, class-conditional DiT fine-tuning.

The same command as ``visionpeft train`` (code: ``visionpeft/cli/train.py``); ``--help`` lists its options.
"""

import sys

from visionpeft.cli.common import run
from visionpeft.cli.train import main

if __name__ == "__main__":
    sys.exit(run(main))
