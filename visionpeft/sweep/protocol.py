"""Evaluation protocols: the stages a sweep trains, their splits, and how stage 1's runs are scored.

``vtab1k`` (VPT / NOAH / PETL_Vision): stage ``select`` trains every grid point on ``train800`` and scores it on
``val200``; stage ``final`` trains the chosen point on ``train800val200`` and tests it, once per seed.
``holdout``: the same shape for datasets with ``train`` / ``val`` / ``trainval`` / ``test`` splits (the demo's mini
tasks). ``none``: every grid point on the config's own splits, once per seed, nothing chosen.

Stage 1 runs with the first seed and is scored by the final (``select: final``, PETL_Vision's choice) or the best
(``select: best``) validation top-1; ties go to the earlier point of the grid. A grid with a single point has
nothing to choose: its select stage is skipped. Only the final stage evaluates on the test split, and only at the end.
Which runs a sweep makes from this is :mod:`.plan`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

EVAL_AT_END = "train.eval_every=1000000000"  # longer than any run: evaluate after the last step only
SELECT = ("final", "best")


@dataclass(frozen=True)
class Protocol:
    """The splits of each stage (None: the protocol has no select stage; ``{}``: the config's own splits) and what
    it does, in words (reports say it)."""

    select: dict[str, str | None] | None
    final: dict[str, str | None]
    text: str


def _splits(train: str, val: str | None, test: str | None) -> dict[str, str | None]:
    return {"data.train_split": train, "data.val_split": val, "data.test_split": test}


PROTOCOLS: dict[str, Protocol] = {
    "vtab1k": Protocol(
        _splits("train800", "val200", None),
        _splits("train800val200", None, "test"),
        "each grid point trained on train800 and scored by its {select} top-1 on val200; the chosen point "
        "trained on train800val200 and tested",
    ),
    "holdout": Protocol(
        _splits("train", "val", None),
        _splits("trainval", None, "test"),
        "each grid point trained on train and scored by its {select} top-1 on val; the chosen point trained "
        "on trainval and tested",
    ),
    "none": Protocol(None, {}, "every grid point trained on the config's own splits and tested; nothing chosen"),
}


def describe(protocol: str, select: str) -> str:
    """What ``protocol`` does, in one sentence for a report."""
    return PROTOCOLS[protocol].text.format(select=select)


def _split_overrides(splits: dict[str, str | None]) -> list[str]:
    return [f"{key}={'null' if value is None else value}" for key, value in splits.items()]


def stage_overrides(protocol: str, select: str, stage: str) -> list[str]:
    """What ``protocol`` sets in a stage, after the grid point and the spec's overrides."""
    chosen = PROTOCOLS[protocol]
    if stage == "select":
        return _split_overrides(chosen.select) + ([EVAL_AT_END] if select == "final" else [])
    return _split_overrides(chosen.final) + ([EVAL_AT_END] if chosen.final else [])


def score(result: dict, select: str) -> float | None:
    """A finished stage-1 run's validation top-1 (final or best)."""
    value = result.get("best_val_top1") if select == "best" else result.get("val", {}).get("top1")
    return None if value is None else float(value)
