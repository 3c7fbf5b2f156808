"""NOAH's subnet search on a trained supernet, on the sweep executors, and the retrain of the found subnet.

    python tools/noah.py RUN_DIR [key=value ...] [--budget 0.64M] [--split S] [--protocol vtab1k]
                         [--retrain-seeds S ...] [--executor local|slurm|ray] [--workers N] [--out DIR]

RUN_DIR is a finished classification run of ``method: {name: noah}`` (the supernet; ``configs/noah/``). Its
adapter (``--adapter``, default ``last``: the final weights, as the official search loads the last checkpoint) is
loaded once per scoring job; every candidate is the supernet's shared weights fixed to one subnet, scored by its
top-1 on ``--split`` (default: the run's validation split). The evolution (:mod:`.noah`) keeps the subnets whose
exact trainable count lies within ``--min-budget`` .. ``--budget`` (``640000``, ``640K`` or ``0.64M``).

The search folder (default ``RUN_DIR/noah_search``) receives ``search.json`` (what the search is), ``history.json``
(every generation: its subnets, their counts and scores, the parents; rewritten after each one), ``subnet.json`` (the
chosen subnet) and ``retrain.yaml``: the supernet's config with ``method: {name: noah, mode: subnet, subnet: ...}``,
the final splits of ``--protocol`` (``vtab1k``: train800val200, tested on test; default ``none``: the run's own) and
the ``key=value`` overrides given here (the official retrain: ``optim.lr=0.001 optim.epochs=100``). The retrain is a
normal run: ``--retrain-seeds 0 1 2`` runs it now through the sweep machinery (``RUN_DIR/noah_search/retrain``, the
same as ``visionpeft sweep retrain.yaml --seeds 0 1 2``). Started again with the same options, a search replays its
seeded generations and runs only the scoring jobs that have not finished; one search at a time holds the folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .executor_args import add_executor_arguments, executor_options

#: the folder a search writes into unless --out says otherwise, inside the supernet's run folder
SEARCH_FOLDER = "noah_search"
SEARCH_LOCK = "search"
UNITS = {"k": 1_000, "m": 1_000_000}


def parameter_count(text: str) -> int:
    """An argparse type: ``640000``, ``640K``, ``0.64M``."""
    number, unit = (text[:-1], UNITS[text[-1].lower()]) if text[-1:].lower() in UNITS else (text, 1)
    try:
        value = float(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a parameter count (640000, 640K, 0.64M), got {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return round(value)


def _parser() -> argparse.ArgumentParser:
    from ..sweep.executors import EXECUTORS
    from ..sweep.noah import SearchSettings
    from ..sweep.protocol import PROTOCOLS

    defaults = SearchSettings()
    parser = argparse.ArgumentParser(
        prog="visionpeft noah", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="the supernet's run folder (method: {name: noah})")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the retrain config")
    parser.add_argument("--budget", type=parameter_count, default=defaults.budget, help="most trainable parameters")
    parser.add_argument("--min-budget", type=parameter_count, default=defaults.min_budget, help="fewest parameters")
    parser.add_argument("--split", help="the split candidates are scored on (default: the run's val split)")
    parser.add_argument(
        "--adapter", default="last", help="the supernet's adapter folder (default: last, the final weights)"
    )
    for name, text in (
        ("population", "subnets per generation"),
        ("select", "parents kept each generation"),
        ("mutation", "mutants per generation"),
        ("crossover", "crossover children per generation"),
        ("generations", "generations after the first"),
        ("seed", "seed of the search"),
    ):
        parser.add_argument(
            f"--{name}", type=int, default=getattr(defaults, name), help=f"{text} (default: %(default)s)"
        )
    parser.add_argument("--m-prob", type=float, default=defaults.m_prob, help="mutation probability of a module")
    parser.add_argument("--s-prob", type=float, default=defaults.s_prob, help="probability a mutation draws a depth")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="none", help="the retrain's splits")
    parser.add_argument("--retrain-seeds", nargs="+", type=int, help="retrain now, once per seed (a sweep)")
    parser.add_argument("--out", type=Path, help=f"the search folder (default: RUN_DIR/{SEARCH_FOLDER})")
    parser.add_argument("--executor", choices=list(EXECUTORS), default="local", help="where jobs go (default: local)")
    parser.add_argument("--workers", type=int, help="scoring jobs per generation and runs at once (default: 1)")
    parser.add_argument("--cpu", action="store_true", help="score on the CPU")
    add_executor_arguments(parser)
    return parser


def retrain_overrides(config, name: str, space, subnet, protocol: str, overrides: list[str]) -> list[str]:
    """The overrides turning the supernet's config into the retrain of ``subnet``: the method ``name``'s entry with
    the supernet's options (``space``) in mode subnet (every other method of a hybrid kept), the protocol's final
    splits, a run name, then the user's overrides."""
    from ..config import methods_of_config
    from ..sweep.protocol import stage_overrides

    entries = []
    for method, options in methods_of_config(config):
        if method == name:
            options = {**space.to_dict(), "mode": "subnet", "subnet": {m: list(v) for m, v in subnet.items()}}
        entries.append({"name": method, **options})
    value = entries[0] if len(entries) == 1 else entries
    return [
        f"method={json.dumps(value)}",
        *stage_overrides(protocol, "final", "final"),
        f"train.run_name={config.train.run_name}_subnet",
        *overrides,
    ]


def _identity(args, run_dir: Path, split: str, settings, space) -> dict[str, Any]:
    return {
        "supernet": str(run_dir),
        "adapter": args.adapter,
        "split": split,
        "settings": asdict(settings),
        "space": json.loads(json.dumps(space.to_dict())),
    }


def _claim(out: Path, identity: dict[str, Any]) -> None:
    """Writes ``search.json``, or checks that the folder's is this search (then it resumes)."""
    path = out / "search.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != identity:
            changed = next(k for k in identity if saved.get(k) != identity[k])
            raise ConfigError(
                f"{out} holds another search (different {changed}); run it with the same options to resume it, or "
                "choose --out"
            )
        return
    _write(path, identity)


def _write(path: Path, data: dict[str, Any], indent: int | None = 1) -> None:
    """A JSON file, written atomically; ``indent=None``: one line per top-level key (a subnet's lists stay whole)."""
    from ..io import atomic_write

    if indent is None:
        text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items()) + "\n}\n"
    else:
        text = json.dumps(data, indent=indent) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def history(state, identity: dict[str, Any], geometry) -> dict[str, Any]:
    """``history.json``: each generation's subnets (count, score) and parents, and the best so far."""

    def entry(key):
        return state.scored[key].record()

    return {
        **identity,
        "geometry": asdict(geometry),
        "generations": [
            {
                "generation": g["generation"],
                "parents": [entry(k) for k in g["parents"]],
                "population": [entry(k) for k in g["population"]],
            }
            for g in state.generations
        ],
        "best": state.best().record(),
    }


def _retrain_sweep(retrain: Path, root: Path, seeds: list[int], executor, label: str) -> int:
    """Runs the retrain config once per seed through the sweep driver (protocol none), as the report row ``label``
    (where published numbers of the method show beside it); returns the number of failed runs."""
    from ..locks import FolderLock
    from ..sweep.driver import check_configs, run_sweep
    from ..sweep.report import write_report
    from ..sweep.spec import SPEC_FILE, SWEEP_LOCK, load_saved_spec, make_spec, save_spec

    spec = make_spec(retrain, {label: {}}, None, seeds, "none", "final", [])
    if (root / SPEC_FILE).is_file() and asdict(load_saved_spec(root)) != asdict(spec):
        raise ConfigError(f"{root} holds the retrain of another config or seeds; choose --out for a new search folder")
    check_configs(spec, root)
    with FolderLock(root, SWEEP_LOCK, "a sweep driver"):
        save_spec(spec, root)
        failed = run_sweep(spec, root, executor)
        for path in write_report(spec, root):
            print(f"wrote {path}")
    return failed


def main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    from ..config import load_config, save_config
    from ..locks import FolderLock
    from ..methods.noah import largest_subnet
    from ..sweep.executors import make_executor
    from ..sweep.noah import Evolution, SearchSettings, check_budget
    from ..sweep.noah_jobs import JobScorer, ScoringFailed, load_supernet, validation_set

    settings = SearchSettings(
        budget=args.budget,
        min_budget=args.min_budget,
        population=args.population,
        select=args.select,
        mutation=args.mutation,
        crossover=args.crossover,
        m_prob=args.m_prob,
        s_prob=args.s_prob,
        generations=args.generations,
        seed=args.seed,
    )
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be a positive integer, got {args.workers}")
    run_dir = args.run_dir.resolve()
    out = (args.out or run_dir / SEARCH_FOLDER).resolve()
    executor = make_executor(args.executor, args.workers, out, executor_options(args))
    config, exp, method = load_supernet(run_dir, args.adapter)  # every input checked before any job
    split = args.split or config.data.val_split
    if split is None:
        raise ConfigError(f"{run_dir} trained without a validation split; give --split (e.g. val200)")
    validation_set(config, exp, split)
    name, space, geometry = method.name, method.config, method.geometry()
    del exp, method  # the workers load their own
    check_budget(space, geometry, settings)
    largest = largest_subnet(space, geometry.layers)
    load_config(run_dir / "config.yaml", retrain_overrides(config, name, space, largest, args.protocol, args.overrides))
    identity = _identity(args, run_dir, split, settings, space)
    with FolderLock(out, SEARCH_LOCK, "a noah search"):
        _claim(out, identity)
        scorer = JobScorer(executor, out, run_dir, args.adapter, split, jobs=args.workers or 1, cpu=args.cpu)

        def on_generation(state) -> None:
            _write(out / "history.json", history(state, identity, geometry))
            best = state.best()
            print(f"  best so far: top1 {100 * best.top1:.2f}% with {best.parameters:,} parameters")

        try:
            best = Evolution(space, geometry, settings, scorer, on_generation).run()
        except ScoringFailed as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        chosen = {**best.record(), "supernet": str(run_dir), "split": split, "budget": args.budget}
        _write(out / "subnet.json", chosen, indent=None)
        found = retrain_overrides(config, name, space, best.subnet, args.protocol, args.overrides)
        retrain = load_config(run_dir / "config.yaml", found)
        save_config(retrain, out / "retrain.yaml")
    print(f"best subnet: {json.dumps(best.record()['subnet'])}")
    print(f"  {best.parameters:,} parameters, {split} top1 {100 * best.top1:.2f}% (generation {best.generation})")
    print(f"wrote {out / 'history.json'}, {out / 'subnet.json'}, {out / 'retrain.yaml'}")
    if not args.retrain_seeds:
        print(f"retrain: this command with --retrain-seeds 0 1 2, or visionpeft train {out / 'retrain.yaml'}")
        return 0
    failed = _retrain_sweep(out / "retrain.yaml", out / "retrain", args.retrain_seeds, executor, name)
    return 1 if failed else 0
