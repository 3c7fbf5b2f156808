"""Run planning: the runs a sweep spec makes under its protocol (:mod:`.protocol`), stage by stage, and the point
stage 1 chooses for stage 2, read from the results on disk."""

from __future__ import annotations

from pathlib import Path

from .grid import Point
from .protocol import PROTOCOLS, score, stage_overrides
from .runs import RunSpec, read_result, run_hash, status
from .spec import SweepSpec
from .tasks import task_override


def make_run(spec: SweepSpec, root: Path, task: str, label: str, point: Point, stage: str, seed: int) -> RunSpec:
    # the grid wins over the sweep's overrides (a grid key is what the sweep varies); the protocol wins over both
    overrides = [
        task_override(task),
        *spec.overrides,
        *point.overrides,
        *stage_overrides(spec.protocol, spec.select, stage),
        *(["data.class_split=base"] if spec.base_to_new else []),
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
