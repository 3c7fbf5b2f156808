"""Generate fill50k, the ControlNet tutorial's toy task, offline and deterministically.

    python tools/make_fill50k.py --out data/fill50k --n 50000 --size 512 --seed 0

Writes ``source/`` (circle outlines: the condition), ``target/`` (the filled circles), ``metadata.jsonl`` (diffusers'
``image`` / ``conditioning_image`` / ``text`` columns, plus the circle and colours the fill metric reads) and
``card.json`` (the generator's parameters). An existing non-empty folder (or a file) is never written into; every
argument is checked before anything is written (``--size`` at most 4096, ``--seed`` 0 or more).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visionpeft.cli.common import positive_int, run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=positive_int, default=50000)
    parser.add_argument("--size", type=positive_int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--palette",
        nargs="+",
        metavar="COLOUR",
        help="only these matplotlib CSS4 colour names (e.g. the tiny pipeline's: red green blue "
        "yellow white black orange purple); default: all 148",
    )
    args = parser.parse_args(argv)
    from visionpeft.data.fill50k import make_fill50k
    from visionpeft.errors import DataError
    from visionpeft.io import kind_problem

    if args.out.exists() and kind_problem(args.out, "folder"):
        raise DataError(f"--out {args.out} {kind_problem(args.out, 'folder')}; give a new folder")
    if args.out.exists() and any(args.out.iterdir()):
        raise DataError(f"{args.out} is not empty; give a new folder")
    if args.size < 32:
        raise DataError(f"--size {args.size} is too small for a circle and its outline; use 32 or more")
    make_fill50k(args.out, args.n, args.size, args.seed, palette=args.palette)
    print(f"wrote {args.n} pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
