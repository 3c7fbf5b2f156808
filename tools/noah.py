"""NOAH's subnet search on a trained supernet (on the sweep executors) and the retrain of the found subnet.

A separate entry point rather than a ``visionpeft sweep`` mode: the sweep command takes configs and sweep folders,
this one a trained run folder, and its options (budget, population, mutation, ...) are the search's own; the
executors, the run folders and the retrain's sweep are the same (code: ``visionpeft/cli/noah.py``).
``--help`` lists its options.
"""

import sys

from visionpeft.cli.common import run
from visionpeft.cli.noah import main

if __name__ == "__main__":
    sys.exit(run(main))
