"""Zero-shot CLIP with hand-written prompts against learned prompts (CoOp / CoCoOp).

The same command as ``visionpeft eval-zeroshot`` (code: ``visionpeft/cli/eval_zeroshot.py``);
``--help`` lists its options.
"""

import sys

from visionpeft.cli.common import run
from visionpeft.cli.eval_zeroshot import main

if __name__ == "__main__":
    sys.exit(run(main))
