"""CLI latency: how long the commands take to answer before any training, side by side with ``import torch``.

Every row is a fresh ``python`` process (what a user waits for), timed ``--rounds`` times in rotated order; the
table gives the median wall time and the ratio to ``import torch``. Targets: ``--help``, a missing config file and
a config key error answer in at most 1 s; ``import visionpeft`` costs at most ``import torch`` + 0.5 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "tools" / "train.py")
DEMO = str(ROOT / "configs" / "demo" / "vpt_tiny_digits.yaml")


def cases(missing: str) -> list[tuple[str, list[str], str]]:
    """(row, command, target)."""
    py = sys.executable
    return [
        ("import torch", [py, "-c", "import torch"], ""),
        ("import visionpeft", [py, "-c", "import visionpeft"], "<= torch + 0.5 s"),
        ("import visionpeft; vp.attach (loads torch)", [py, "-c", "import visionpeft as vp; vp.attach"], ""),
        ("tools/train.py --help", [py, TRAIN, "--help"], "<= 1 s"),
        ("tools/train.py missing.yaml", [py, TRAIN, missing], "<= 1 s"),
        ("config key error (optim.lrr=1)", [py, TRAIN, DEMO, "optim.lrr=1"], "<= 1 s"),
        ("config value error (optim.schedule=cosin)", [py, TRAIN, DEMO, "optim.schedule=cosin"], "<= 1 s"),
        ("method option error (method.num_tokns=1)", [py, TRAIN, DEMO, "method.num_tokns=1"], ""),
        ("--print-config", [py, TRAIN, DEMO, "--print-config"], ""),
    ]


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, cwd=ROOT, check=False)
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = cases(str(Path(tmp) / "missing.yaml"))
        times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
        for r in range(args.rounds):
            for name, command, _ in rows[r % len(rows) :] + rows[: r % len(rows)]:
                times[name].append(timed(command))
    torch = statistics.median(times["import torch"])
    version = sys.version.split()[0]
    print(f"# {args.rounds} rounds, rotated order, median wall time of a fresh process (python {version})")
    print()
    print("| command | wall (s) | vs import torch | target |")
    print("|---|---:|---:|---|")
    for name, _, target in rows:
        median = statistics.median(times[name])
        print(f"| `{name}` | {median:.2f} | {median / torch:.2f} | {target} |")
    return 0
