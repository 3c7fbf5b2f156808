"""Published numbers a sweep report shows next to its own: ``published_vtab1k.csv`` (its header cites the source).

Rows are keyed by ``(method, task)``; a sweep's grid label is matched against ``method`` (``grids/lora.yaml`` makes
the label ``lora``, which meets PETL_Vision's ``lora``).
"""

from __future__ import annotations

import csv
import json
from functools import cache
from pathlib import Path

TABLE = Path(__file__).with_name("published_vtab1k.csv")


@cache
def published(path: Path = TABLE) -> dict[tuple[str, str], dict]:
    """``(method, task) -> {"source", "top1" (percent), "params" (head excluded), "best_tune"}``."""
    with open(path, newline="") as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return {
            (row["method"], row["task"]): {
                "source": row["source"],
                "top1": float(row["top1"]),
                "params": int(row["params"]) if row["params"] else None,
                "best_tune": json.loads(row["best_tune"]) if row["best_tune"] else {},
            }
            for row in rows
        }
