"""NOAH on the demo: per mini task, the supernet, the evolutionary search and the retrain of the found subnet, so that
NOAH gets a row beside the demo sweep's methods (gallery/demo_*_results.md).

    python tools/benchmark.py noah-demo [--tasks digits textures faces] [--seeds 0 1 2] [--budget 30K]
                                        [--supernet-epochs 5] [--epochs 8] [--population 10] [--generations 4]
                                        [--workers 1]

NOAH cannot be a grid point of the demo sweep: a run trains the supernet, a search picks a subnet, a second run
trains that. Per task, in ``runs/sweeps/demo_noah/<task>/``: ``supernet/`` is the sweep of
``configs/noah/supernet_tiny_digits.yaml`` (``data.name=<task>``, the committed tiny ViT checkpoint as the demo sweep
passes it, seed 0, on train with val); ``search/`` is ``visionpeft noah`` on that run (scored on val, under
``--budget`` trainable parameters, the official population / select / mutation / crossover of 50 / 10 / 25 / 25
scaled to ``--population``; by default 10 and 4 generations, and 5 supernet epochs instead of the config's 10, so
that the three tasks take about 70 minutes of a shared 2-core CPU); then the same command with ``--retrain-seeds``
retrains the found subnet on train + val for ``--epochs`` and tests it once per seed (``--protocol holdout``: the
final stage of the demo sweep's protocol). Each step resumes where it stopped (finished runs and scoring jobs are
kept); ``times.json`` sums each step's wall time over the calls. The gallery files
``gallery/demo_noah_results.{md,json}`` give the demo gallery's row (params without the head, test top-1 mean +- std
over the seeds per task), each task's subnet and the minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUPERNET_CONFIG = ROOT / "configs" / "noah" / "supernet_tiny_digits.yaml"
CHECKPOINT = ROOT / "checkpoints" / "tiny_vit_fractal.safetensors"
#: each task's wall seconds per step, summed over the calls
TIMES = "times.json"
STEPS = ("supernet", "search", "retrain")
#: the official search (population, select, mutation, crossover); a smaller population scales the others
OFFICIAL = (50, 10, 25, 25)


def search_sizes(population: int) -> dict[str, int]:
    """The official select / mutation / crossover scaled to ``population`` (at least one parent)."""
    scale = population / OFFICIAL[0]
    select, mutation, crossover = (round(n * scale) for n in OFFICIAL[1:])
    return {"population": population, "select": max(1, select), "mutation": mutation, "crossover": crossover}


def parser() -> argparse.ArgumentParser:
    from visionpeft.cli.common import positive_int
    from visionpeft.cli.noah import parameter_count

    p = argparse.ArgumentParser(
        prog="tools/benchmark.py noah-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", nargs="+", default=["digits", "textures", "faces"], help="mini tasks (or: demo)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the retrain")
    p.add_argument("--budget", type=parameter_count, default=30_000, help="most trainable parameters of a subnet")
    p.add_argument("--supernet-epochs", type=positive_int, default=5, help="the supernet's epochs (its config: 10)")
    p.add_argument("--epochs", type=positive_int, default=8, help="the retrain's epochs (the demo sweep: 8)")
    p.add_argument("--population", type=positive_int, default=10, help="subnets per generation of the search")
    p.add_argument("--generations", type=int, default=4, help="generations of the search after the first")
    p.add_argument("--workers", type=positive_int, default=1, help="local worker processes")
    p.add_argument("--out", type=Path, default=ROOT / "gallery")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "sweeps" / "demo_noah", help="the runs' folder")
    return p


def command_line(args: argparse.Namespace) -> str:
    """The command as a user would type it (what the gallery says made it), every setting spelled out."""
    parts = ["python tools/benchmark.py noah-demo", "--tasks", *args.tasks, "--seeds", *map(str, args.seeds)]
    for option in ("budget", "supernet_epochs", "epochs", "population", "generations"):
        parts += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return " ".join(parts)


def timed(folder: Path, step: str, call: Callable[[], int]) -> int:
    """Runs ``call`` and adds its wall seconds to ``step`` in ``folder/times.json``; returns its exit code."""
    start = time.perf_counter()
    code = call()
    path = folder / TIMES
    times = json.loads(path.read_text()) if path.is_file() else {}
    times[step] = round(times.get(step, 0.0) + time.perf_counter() - start, 1)
    path.write_text(json.dumps(times, indent=1) + "\n")
    return code


def supernet_run(folder: Path) -> Path:
    """The trainer's run folder of the supernet sweep in ``folder`` (its one run)."""
    from visionpeft.sweep.plan import final_runs
    from visionpeft.sweep.runs import TRAIN
    from visionpeft.sweep.spec import load_saved_spec

    (run,) = final_runs(load_saved_spec(folder), folder)
    return run.path / TRAIN


def search_arguments(args: argparse.Namespace, supernet: Path, out: Path) -> list[str]:
    """``visionpeft noah``'s arguments: the search of ``supernet`` into ``out`` and its retrain's settings."""
    sizes = [f"--{name}={value}" for name, value in search_sizes(args.population).items()]
    return [
        str(supernet),
        f"optim.epochs={args.epochs}",
        f"--budget={args.budget}",
        *sizes,
        f"--generations={args.generations}",
        "--protocol=holdout",
        f"--workers={args.workers}",
        f"--out={out}",
    ]


def run_task(args: argparse.Namespace, task: str) -> int:
    """The supernet, the search and the retrain of ``task`` (each resumed where it stopped); returns an exit code."""
    from visionpeft.cli.common import run
    from visionpeft.cli.noah import main as noah
    from visionpeft.cli.sweep import main as sweep

    folder = args.runs / task
    folder.mkdir(parents=True, exist_ok=True)
    supernet = [
        str(SUPERNET_CONFIG),
        f"model.checkpoint={CHECKPOINT}",  # from any folder
        f"optim.epochs={args.supernet_epochs}",
        f"--tasks={task}",
        "--seeds=0",
        f"--workers={args.workers}",
        f"--out={folder / 'supernet'}",
    ]
    code = timed(folder, "supernet", lambda: run(sweep, supernet))
    if code:
        return code
    search = search_arguments(args, supernet_run(folder / "supernet"), folder / "search")
    code = timed(folder, "search", lambda: run(noah, search))
    if code:
        return code
    return timed(folder, "retrain", lambda: run(noah, [*search, "--retrain-seeds", *map(str, args.seeds)]))


def largest_subnet_parameters(space: dict, geometry: dict) -> int:
    """What the largest subnet of a search space (``history.json``'s ``space`` and ``geometry``) trains."""
    from visionpeft.methods import make_config
    from visionpeft.methods.noah import Geometry, largest_subnet, subnet_parameters

    shape = Geometry(**geometry)
    return subnet_parameters(largest_subnet(make_config("noah", space), shape.layers), shape)


def task_result(folder: Path, task: str) -> dict | None:
    """What the gallery shows of ``task`` (its folder under ``--runs``): the chosen subnet (``search/subnet.json``),
    the retrain's report row (``search/retrain/summary.csv``) and the minutes per step; None before the retrain's
    report exists."""
    report = folder / "search" / "retrain" / "summary.csv"
    if not report.is_file():
        return None
    chosen = json.loads((folder / "search" / "subnet.json").read_text())
    with open(report, newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["method"] == "noah" and r["task"] == task)
    times = json.loads((folder / TIMES).read_text()) if (folder / TIMES).is_file() else {}
    searched = json.loads((folder / "search" / "history.json").read_text())

    def number(key: str, kind: type = float):
        return kind(row[key]) if row[key] else None

    return {
        "task": task,
        "seeds": int(row["seeds"]),
        "top1_mean": number("top1_mean"),
        "top1_std": number("top1_std"),
        "trainable_without_head": number("trainable_without_head", int),
        "state": row["state"],
        "subnet": chosen["subnet"],
        "subnet_parameters": chosen["parameters"],
        "search_val_top1": round(100 * chosen["top1"], 2),
        "largest_subnet_parameters": largest_subnet_parameters(searched["space"], searched["geometry"]),
        "minutes": {step: round(times.get(step, 0.0) / 60, 1) for step in STEPS},
    }


def _cell(result: dict | None) -> str:
    if result is None or result["top1_mean"] is None:
        return "-"
    std = "" if result["top1_std"] is None else f" ± {result['top1_std']:.1f}"
    return f"{result['top1_mean']:.1f}{std}" + (f" ({result['state']})" if result["state"] else "")


def _subnet(subnet: dict[str, list[int]]) -> str:
    """``vpt 10 5 0 0 0 0; lora ...; adapter ...``: each module's width per block."""
    return "; ".join(f"{module} {' '.join(map(str, widths))}" for module, widths in subnet.items())


def total_minutes(results: dict[str, dict | None]) -> float:
    """The wall minutes of every step of every task with a result."""
    return sum(sum(r["minutes"].values()) for r in results.values() if r is not None)


def gallery_text(results: dict[str, dict | None], command: str, args: argparse.Namespace) -> str:
    """The gallery page: the demo gallery's row for ``noah``, then each task's subnet and minutes."""
    from visionpeft.config import read_config_file

    configured = read_config_file(SUPERNET_CONFIG)["optim"]["epochs"]
    done = [r for r in results.values() if r is not None]
    counts = [r["trainable_without_head"] for r in done if r["trainable_without_head"] is not None]
    params = f"{statistics.fmean(counts) / 1e6:.3f}" if counts else "-"
    largest = {r["largest_subnet_parameters"] for r in done}
    sizes = search_sizes(args.population)
    lines = [
        "# Demo: NOAH on the FractalDB-pretrained tiny ViT and the mini tasks",
        "",
        f"Made by `{command}`",
        f"on a 2-core CPU shared with other jobs, in {total_minutes(results):.0f} minutes of wall time. Test "
        "top-1 (%) of the retrained subnet.",
        "",
        f"Per task: the supernet `configs/noah/supernet_tiny_digits.yaml` (`data.name=<task>`, checkpoint "
        f"`checkpoints/tiny_vit_fractal.safetensors`, seed 0) trained {args.supernet_epochs} epochs on train (the "
        f"config trains {configured}); NOAH's evolutionary search (`visionpeft noah`) for the subnet with the best "
        f"val top-1 on the supernet's weights among those training at most {args.budget:,} parameters (the largest "
        f"subnet of this space trains {' / '.join(f'{n:,}' for n in sorted(largest)) or '-'}), population "
        f"{sizes['population']}, select {sizes['select']}, mutation {sizes['mutation']}, crossover "
        f"{sizes['crossover']}, {args.generations} generations after the first (the official search: 50 / 10 / 25 / "
        "25, 15 generations; the smaller supernet and search keep the three tasks within about 70 minutes of a "
        f"shared 2-core CPU); the found subnet retrained on trainval for {args.epochs} epochs (the demo sweep "
        f"trains 8) and tested, seeds {', '.join(map(str, args.seeds))} (protocol `holdout`'s final stage, as the "
        "demo sweep's rows).",
        "",
        "Test top-1 (%), mean ± std over the seeds. Params: trainable parameters without the task head, in "
        "millions (the mean over the tasks: each task has its own subnet).",
        "",
        "| method | params (M) | " + " | ".join(results) + " |",
        "|---|---:|" + "---:|" * len(results),
        f"| noah | {params} | " + " | ".join(_cell(r) for r in results.values()) + " |",
        "",
        "## The subnet found per task",
        "",
        "Widths per block (blocks 1 .. 6; 0: off) of the VPT prompts, the LoRA rank on qkv and the adapter.",
        "",
        "| task | subnet | params | search val top-1 (%) | minutes (supernet / search / retrain) |",
        "|---|---|---:|---:|---|",
    ]
    for task, r in results.items():
        if r is None:
            lines.append(f"| {task} | - | - | - | - |")
            continue
        spent = " / ".join(f"{r['minutes'][step]:.1f}" for step in STEPS)
        lines.append(
            f"| {task} | {_subnet(r['subnet'])} | {r['subnet_parameters']:,} | {r['search_val_top1']:.1f} | {spent} |"
        )
    return "\n".join(lines) + "\n"


def write_gallery(args: argparse.Namespace, tasks: list[str], command: str) -> str | None:
    """``demo_noah_results.md`` and ``.json`` in ``args.out`` from the task folders under ``args.runs``; returns the
    markdown, or None (nothing written) while no task has its retrain's report."""
    results = {task: task_result(args.runs / task, task) for task in tasks}
    if all(r is None for r in results.values()):
        return None
    text = gallery_text(results, command, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_noah_results.md").write_text(text)
    rows = [r for r in results.values() if r is not None]
    saved = {"command": command, "minutes": round(total_minutes(results), 1), "rows": rows}
    (args.out / "demo_noah_results.json").write_text(json.dumps(saved, indent=2) + "\n")
    return text


def _main(argv: list[str]) -> int:
    from visionpeft.errors import ConfigError
    from visionpeft.sweep.noah import SearchSettings
    from visionpeft.sweep.tasks import TASK_SETS, resolve_tasks

    args = parser().parse_args(argv)
    args.tasks = resolve_tasks(args.tasks)
    other = [task for task in args.tasks if task not in TASK_SETS["demo"]]
    if other:
        mini = ", ".join(TASK_SETS["demo"])
        raise ConfigError(f"noah-demo runs on the mini tasks ({mini}), not on {', '.join(other)}")
    SearchSettings(budget=args.budget, generations=args.generations, **search_sizes(args.population))  # before training
    args.runs = args.runs.resolve()
    code = 0
    for task in args.tasks:
        code = run_task(args, task)
        if code:
            break
    if code in (2, 130):  # a mistake or an interruption: the gallery stays as it was
        return code
    text = write_gallery(args, args.tasks, command_line(args))
    print(text or "no task has finished its retrain yet: the gallery files are left as they were")
    return code


def main(argv: list[str]) -> int:
    from visionpeft.cli.common import run

    return run(_main, argv)
