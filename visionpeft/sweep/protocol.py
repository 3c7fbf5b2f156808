"""Evaluation protocols: which runs a sweep makes, in which stages, and how stage 1 chooses stage 2's point.

``vtab1k`` (VPT / NOAH / PETL_Vision): stage ``select`` trains every grid point on ``train800`` and scores it on
``val200``; stage ``final`` trains the chosen point on ``train800val200`` and tests it, once per seed.
``holdout``: the same shape for datasets with ``train`` / ``val`` / ``trainval`` / ``test`` splits (the demo's mini
tasks). ``none``: every grid point on the config's own splits, once per seed, nothing chosen.

Stage 1 runs with the first seed and is scored by the final (``select: final``, PETL_Vision's choice) or the best
(``select: best``) validation top-1; ties go to the earlier point of the grid. A grid with a single point has
nothing to choose: its select stage is skipped. Only the final stage evaluates on the test split, and only at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .grid import Point
from .runs import RunSpec, read_result, run_hash, status
from .tasks import task_override

if TYPE_CHECKING:  # spec.py checks protocol names against PROTOCOLS
    from .spec import SweepSpec

EVAL_AT_END = "train.eval_every=1000000000"  # longer than any run: evaluate after the last step only


@dataclass(frozen=True)
class Protocol:
    """The splits of each stage (None: the protocol has no select stage; ``{}``: the config's own splits)."""

    select: dict[str, str | None] | None
    final: dict[str, str | None]


def _splits(train: str, val: str | None, test: str | None) -> dict[str, str | None]:
    return {"data.train_split": train, "data.val_split": val, "data.test_split": test}


PROTOCOLS: dict[str, Protocol] = {
    "vtab1k": Protocol(_splits("train800", "val200", None), _splits("train800val200", None, "test")),
    "holdout": Protocol(_splits("train", "val", None), _splits("trainval", None, "test")),
    "none": Protocol(None, {}),
}


def _split_overrides(splits: dict[str, str | None]) -> list[str]:
    return [f"{key}={'null' if value is None else value}" for key, value in splits.items()]


def stage_overrides(spec: SweepSpec, stage: str) -> list[str]:
    """What the protocol sets in a stage, after the grid point and the spec's overrides."""
    protocol = PROTOCOLS[spec.protocol]
    if stage == "select":
        return _split_overrides(protocol.select) + ([EVAL_AT_END] if spec.select == "final" else [])
    return _split_overrides(protocol.final) + ([EVAL_AT_END] if protocol.final else [])


def make_run(spec: SweepSpec, root: Path, task: str, label: str, point: Point, stage: str, seed: int) -> RunSpec:
    # the grid wins over the sweep's overrides (a grid key is what the sweep varies); the protocol wins over both
    overrides = [
        task_override(task),
        *spec.overrides,
        *point.overrides,
        *stage_overrides(spec, stage),
        f"train.seed={seed}",
    ]
    digest = run_hash(spec.digest, overrides, seed, stage)
    folder = root / "runs" / task / label / f"{stage}-s{seed}-{digest}"
    return RunSpec(spec.config, tuple(overrides), task, label, stage, seed, point.choices, str(folder))


def has_select_stage(spec: SweepSpec, label: str) -> bool:
    return PROTOCOLS[spec.protocol].select is not None and len(spec.points(label)) > 1


def select_runs(spec: SweepSpec, root: Path) -> list[RunSpec]:
    """Stage 1: every grid point of every task (grids with more than one point), first seed."""
    return [
        make_run(spec, root, task, label, point, "select", spec.seeds[0])
        for task in spec.tasks
        for label in spec.grids
        if has_select_stage(spec, label)
        for point in spec.points(label)
    ]


def score(result: dict, select: str) -> float | None:
    """A finished stage-1 run's validation top-1 (final or best)."""
    value = result.get("best_val_top1") if select == "best" else result.get("val", {}).get("top1")
    return None if value is None else float(value)


def choose(spec: SweepSpec, root: Path, task: str, label: str) -> tuple[Point | None, int]:
    """The point stage 2 trains for ``(task, label)`` and how many stage-1 runs are still pending (the point is
    None until none is, or when none of them succeeded; a failed run is not chosen)."""
    points = spec.points(label)
    if not has_select_stage(spec, label):
        return points[0], 0
    best, best_score, unfinished = None, None, 0
    for point in points:
        run = make_run(spec, root, task, label, point, "select", spec.seeds[0])
        state = status(run.path)
        unfinished += state == "pending"
        value = score(read_result(run.path), spec.select) if state == "done" else None
        if value is not None and (best_score is None or value > best_score):
            best, best_score = point, value
    return (best if unfinished == 0 else None), unfinished


def final_points(spec: SweepSpec, root: Path, task: str, label: str) -> list[Point]:
    """The points stage 2 trains for ``(task, label)``: every point without a select stage in the protocol, else
    the chosen one once stage 1 has chosen (none before)."""
    if PROTOCOLS[spec.protocol].select is None:
        return spec.points(label)
    point, _ = choose(spec, root, task, label)
    return [] if point is None else [point]


def final_runs(spec: SweepSpec, root: Path) -> list[RunSpec]:
    """Stage 2: the final points of every ``(task, label)``, for every seed."""
    return [
        make_run(spec, root, task, label, point, "final", seed)
        for task in spec.tasks
        for label in spec.grids
        for point in final_points(spec, root, task, label)
        for seed in spec.seeds
    ]
