"""Hyper-parameter sweeps and evaluation protocols (VTAB-1k) on one machine or a cluster, with a report.

    visionpeft sweep CONFIG [key=value ...] --grid GRID [GRID ...] [--tasks T ...] [--seeds S ...] [--protocol P]
    visionpeft sweep SPEC.yaml [--executor ...]         # a sweep spec file (config, grids, tasks, seeds, protocol)
    visionpeft sweep SWEEP_DIR                          # resume: run only what has not finished
    visionpeft sweep SWEEP_DIR --report                 # the tables, at any time, from what has finished

    visionpeft sweep configs/vtab/caltech101.yaml --grid grids/lora.yaml --tasks vtab --seeds 0 1 2 --protocol vtab1k
    visionpeft sweep grids/demo_clip_base2new.yaml                # base-to-new (or --base-to-new): base / new / HM
    visionpeft sweep ... --executor slurm --slurm.partition gpu --slurm.gpus_per_job 1 --workers 32
    visionpeft sweep ... --executor ray --ray.address auto

(``python tools/sweep.py`` is the same command.) A grid file maps config keys to values; a list is an axis (see
``visionpeft/sweep/grid.py``). Every run is a folder named by a hash of what it trains; a finished run is never
redone, a failed one is recorded and the sweep goes on. The sweep folder receives ``sweep.yaml`` (the spec),
``runs/``, ``summary.md``, ``summary.csv`` and ``accuracy_vs_params.png``. Every grid point's config is checked
before any run starts. One driver at a time runs a sweep folder (it holds ``sweep.lock``; a second one says which
process holds it and exits).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from ..io import kind_problem
from .common import positive_int
from .executor_args import add_executor_arguments, executor_options

DEFAULT_ROOT = Path("runs") / "sweeps"


def _parser() -> argparse.ArgumentParser:
    from ..sweep.executors import EXECUTORS
    from ..sweep.protocol import PROTOCOLS, SELECT

    parser = argparse.ArgumentParser(
        prog="visionpeft sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="a run config, a sweep spec file, or a sweep folder (resume / report)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of every run")
    parser.add_argument("--grid", nargs="+", type=Path, default=[], help="grid files (each one a row: its stem)")
    parser.add_argument("--tasks", nargs="+", help="tasks or task sets (vtab, vtab-natural, demo, ...)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds of the final stage (default: 0)")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), help="vtab1k, holdout, or none (default)")
    parser.add_argument("--select", choices=list(SELECT), help="choose by the final (default) or best val top-1")
    parser.add_argument(
        "--base-to-new",
        action="store_const",
        const=True,
        help="train on the base half of each task's classes; report base, new and their harmonic mean (CoCoOp)",
    )
    parser.add_argument("--out", type=Path, help=f"the sweep folder (default: {DEFAULT_ROOT}/<grids>-<protocol>)")
    parser.add_argument("--executor", choices=list(EXECUTORS), default="local", help="where runs go (default: local)")
    parser.add_argument("--workers", type=positive_int, help="runs at once (local default: one per GPU, or 1)")
    parser.add_argument("--dry-run", action="store_true", help="check every config and list the runs; run nothing")
    parser.add_argument("--report", action="store_true", help="write and print the report of a sweep folder")
    add_executor_arguments(parser)
    return parser


def _resolve(args, parser):
    """(spec, sweep folder) from the arguments: a folder's own spec, or a new one (refused by a folder that holds
    another sweep)."""
    from ..errors import ConfigError
    from ..sweep import spec as specs

    source = Path(args.source)
    given = {
        "tasks": args.tasks,
        "seeds": args.seeds,
        "protocol": args.protocol,
        "select": args.select,
        "base_to_new": args.base_to_new,
    }
    if source.is_dir():
        if args.grid or args.overrides or any(v is not None for v in given.values()) or args.out:
            raise ConfigError(
                f"{source} is a sweep folder: it keeps its spec; give no grid, tasks, seeds, protocol, "
                "overrides or --out (start a new sweep from a config for another spec)"
            )
        spec = specs.load_saved_spec(source)
        if not args.report and Path(spec.config).is_file() and specs.digest_of(spec.config) != spec.digest:
            raise ConfigError(
                f"the config {spec.config} changed since this sweep began, so its runs would not be "
                "this sweep's; start a new sweep with --out"
            )
        return spec, source
    if args.report:
        parser.error("--report takes a sweep folder")
    if not source.is_file():
        raise ConfigError(f"{source} is neither a config file, a sweep spec file nor a sweep folder")
    if specs.is_spec_file(source):
        if args.grid:
            raise ConfigError(f"{source} is a sweep spec: its grids are in the file; give no --grid")
        spec = specs.load_spec_file(source, args.overrides, **given)
        name = source.stem
    else:
        spec = specs.make_spec(
            source,
            specs.grids_from_files(args.grid),
            args.tasks,
            args.seeds or [0],
            args.protocol or "none",
            args.select or "final",
            args.overrides,
            bool(args.base_to_new),
        )
        name = "-".join(spec.grids) + ("" if spec.protocol == "none" else f"-{spec.protocol}")
        name += "-base2new" if spec.base_to_new else ""
    out = args.out or DEFAULT_ROOT / name
    wrong = kind_problem(out, "folder") if out.exists() else None
    if wrong is not None:
        raise ConfigError(f"--out {out} {wrong} (the sweep folder)")
    if (out / specs.SPEC_FILE).is_file():
        _compare_with_saved(spec, out, announce=False)  # early: before every config is checked
    return spec, out


def _compare_with_saved(spec, out: Path, announce: bool = True) -> None:
    """Refuses a spec that is not the one ``out`` keeps nor an extension of it; says what an extension adds."""
    from ..errors import ConfigError
    from ..sweep import spec as specs

    if not (out / specs.SPEC_FILE).is_file():
        return
    saved = specs.load_saved_spec(out)
    if asdict(saved) == asdict(spec):
        return
    if not specs.extends(spec, saved):
        raise ConfigError(
            f"{out} holds another sweep; resume it with 'visionpeft sweep {out}', extend it "
            "with more seeds (after its own) or tasks, or choose --out"
        )
    pairs = (("seeds", saved.seeds, spec.seeds), ("tasks", saved.tasks, spec.tasks))
    grown = [f"{name} {before} -> {after}" for name, before, after in pairs if before != after]
    if announce:
        print(f"extending the sweep in {out}: {', '.join(grown)}; its finished runs are kept")


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    from ..locks import FolderLock
    from ..sweep.driver import check_configs, list_runs, run_sweep
    from ..sweep.executors import make_executor
    from ..sweep.report import write_report
    from ..sweep.spec import SWEEP_LOCK, save_spec

    spec, out = _resolve(args, parser)
    if args.report:
        for path in write_report(spec, out):
            print(f"wrote {path}")
        print((out / "summary.md").read_text(), end="")
        return 0
    executor = make_executor(args.executor, args.workers, out, executor_options(args))
    check_configs(spec, out)
    if args.dry_run:
        list_runs(spec, out, print)
        return 0
    # one driver per sweep folder: a second one would train the same runs and clear the other's unfinished ones
    with FolderLock(out, SWEEP_LOCK, "a sweep driver"):
        _compare_with_saved(spec, out)  # again, under the lock: another driver may have saved its spec meanwhile
        save_spec(spec, out)
        print(f"sweep folder: {out}")
        failed = run_sweep(spec, out, executor)
        for path in write_report(spec, out):
            print(f"wrote {path}")
    return 1 if failed else 0
