"""Helpers for the sweep tests: short runs of the digits demo, grid files, the sweep command in-process."""

from __future__ import annotations

from pathlib import Path

from _demo_utils import CHECKPOINT, MAIN_CONFIG, ROOT

#: two optimizer steps of the digits demo: a run takes seconds, not minutes
FAST = [
    f"model.checkpoint={CHECKPOINT}",
    "optim.epochs=null",
    "optim.warmup_epochs=null",
    "optim.steps=2",
    "data.batch_size=32",
]
DIGITS = MAIN_CONFIG
VTAB_CONFIG = ROOT / "configs" / "vtab" / "caltech101.yaml"


def write_grid(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def sweep(argv: list[str], capsys) -> tuple[int, str, str]:
    """Runs ``visionpeft sweep ARGV`` in this process; returns (exit code, stdout, stderr)."""
    from visionpeft.cli.common import run
    from visionpeft.cli.sweep import main

    code = run(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
