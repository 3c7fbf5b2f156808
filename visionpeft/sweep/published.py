"""Published numbers a sweep report shows next to its own: ``published_vtab1k.csv`` (its header cites the sources).

Rows are keyed by ``(method, task)``; a sweep's grid label is matched against ``method`` (``grids/lora.yaml`` makes
the label ``lora``, which meets PETL_Vision's ``lora``; ``grids/adapter_houlsby.yaml`` meets their
``rand_h_adapter``, stored under our label). Each row names its ``source``, one of :data:`SOURCES`.
"""

from __future__ import annotations

import csv
import json
from functools import cache
from pathlib import Path

TABLE = Path(__file__).with_name("published_vtab1k.csv")

#: A row's ``source`` -> what it is, in the words the report uses.
SOURCES = {
    "petl_vision": "PETL_Vision's re-tuned VTAB-1k runs",
    "noah_paper": "the NOAH paper's Table 1",
}


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
