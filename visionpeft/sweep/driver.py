"""Runs a sweep: check every run's config, run what is missing of stage 1, choose, run what is missing of stage 2,
write the report. Started again, it runs only what has not finished."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .plan import final_runs, has_select_stage, make_run, select_runs
from .protocol import PROTOCOLS
from .runs import RunSpec, read_error, status
from .spec import SweepSpec

Print = Callable[[str], None]


def check_configs(spec: SweepSpec, root: Path) -> None:
    """Loads the config of every grid point in every stage (with the first task: tasks change only ``data.name``),
    so a grid key that is not a config key, a bad value or a bad option stops the sweep before any run."""
    from ..config import load_config

    load_config(spec.config, list(spec.overrides))  # a bad override of the command line is named as such
    stages = ["select", "final"] if PROTOCOLS[spec.protocol].select is not None else ["final"]
    for label in spec.grids:
        for point in spec.points(label):
            for stage in stages:
                run = make_run(spec, root, spec.tasks[0], label, point, stage, spec.seeds[0])
                try:
                    load_config(spec.config, list(run.overrides))
                except ConfigError as err:
                    raise ConfigError(f"grid '{label}': {err}") from None


def _describe(record: dict[str, Any]) -> str:
    if record.get("status") != "done":
        return f"FAILED: {record.get('error')}"
    test, val = record.get("test") or {}, record.get("val") or {}
    metric = f"test top1 {100 * test['top1']:.1f}%" if "top1" in test else ""
    metric = metric or (f"val top1 {100 * val['top1']:.1f}%" if "top1" in val else "finished")
    return f"{metric} ({record.get('seconds', 0):.0f} s)" + (" (already finished)" if record.get("skipped") else "")


def _wave(executor: Any, runs: list[RunSpec], name: str, out: Print) -> int:
    """Runs ``runs`` (the unfinished ones of a stage); returns how many failed."""
    missing = [run for run in runs if status(run.path) != "done"]
    out(f"{name}: {len(runs)} runs, {len(runs) - len(missing)} finished before, {len(missing)} to run")
    if not missing:
        return 0
    count = {"done": 0, "failed": 0}

    def on_done(run: RunSpec, record: dict[str, Any]) -> None:
        count["done" if record.get("status") == "done" else "failed"] += 1
        out(f"  [{sum(count.values())}/{len(missing)}] {run.name()}: {_describe(record)}")

    executor.run(missing, on_done)
    return count["failed"]


def list_runs(spec: SweepSpec, root: Path, out: Print) -> None:
    """``--dry-run``: the runs of each stage with their status, and what stage 2 waits for."""
    first = select_runs(spec, root)
    if first:
        out(f"stage select ({len(first)} runs, seed {spec.seeds[0]}):")
        for run in first:
            out(f"  {status(run.path):<8}{run.name()}  {run.path}")
    second = final_runs(spec, root)
    out(f"stage final ({len(second)} runs{' so far' if first else ''}):")
    for run in second:
        out(f"  {status(run.path):<8}{run.name()}  {run.path}")
    chosen = {(run.task, run.label) for run in second}
    waiting = [
        (t, label)
        for t in spec.tasks
        for label in spec.grids
        if has_select_stage(spec, label) and (t, label) not in chosen
    ]
    if waiting:
        out(
            f"  + {len(waiting) * len(spec.seeds)} runs once stage select has chosen the point of "
            f"{len(waiting)} task x grid pairs ({len(spec.seeds)} seed(s) each)"
        )


def run_sweep(spec: SweepSpec, root: Path, executor: Any, out: Print = print) -> int:
    """Runs what is missing; returns the number of failed runs (their errors are in their folders)."""
    failed = 0
    first = select_runs(spec, root)
    if first:
        failed += _wave(executor, first, "stage select", out)
    second = final_runs(spec, root)  # planned from stage 1's results on disk
    failed += _wave(executor, second, "stage final", out)
    for run in [*first, *second]:
        if status(run.path) == "failed":
            out(f"failed: {run.name()}: {read_error(run.path)} (traceback in {run.path / 'traceback.txt'})")
    return failed
