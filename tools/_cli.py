"""Shared command-line plumbing: user mistakes become one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Calls ``main(argv)``; a :class:`visionpeft.VisionPEFTError` prints ``error: ...`` and returns 2."""
    from visionpeft.errors import VisionPEFTError

    try:
        return main(sys.argv[1:] if argv is None else argv) or 0
    except VisionPEFTError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
