"""Hyper-parameter sweeps and the VTAB-1k protocol, on one machine or a cluster, with a report.

The same command as ``visionpeft sweep`` (code: ``visionpeft/cli/sweep.py``); ``--help`` lists its options.
"""

import sys

from visionpeft.cli.common import run
from visionpeft.cli.sweep import main

if __name__ == "__main__":
    sys.exit(run(main))
