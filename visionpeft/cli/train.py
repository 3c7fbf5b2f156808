"""Train any registered task (listed at the end of ``--help``) from its config.

    visionpeft train CONFIG [key=value ...] [--dry-run] [--print-config] [--stop-after N]
    visionpeft train --resume RUN_DIR
    accelerate launch --num_processes 2 -m visionpeft train CONFIG ...     # several GPUs / processes

(``python tools/train.py`` is the same command.) CONFIG is a YAML file (``_base_`` inheritance) whose ``task:`` key
(default ``classification``) picks the trainer; ``key=value`` overrides any entry (``optim.lr=0.01``,
``method.num_tokens=10``). ``--print-config`` shows the resolved config with each field's meaning. The run folder
(``train.output_dir/train.run_name``) receives the resolved ``config.yaml``, ``metrics.jsonl``, TensorBoard logs,
the ``last`` / ``best`` adapters, the resumable state and the task's outputs. A new run never writes into a folder
that exists: the name taken, it goes to ``NAME-2``, ``NAME-3``, ... (``--overwrite`` replaces an earlier run's own
files instead, and refuses a folder holding anything else); a folder a run is training in is locked (``run.lock``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import add_run_arguments, configure_logging, run_folder


def report(results: dict[str, Any], run_dir=None, seconds: float | None = None) -> None:
    """Prints what a run produced on one screen: the result, trainable parameters, wall time, where the files are."""
    test = results.get("test")
    if test and "top1" in test:
        top5 = f", top5 {100 * test['top5']:.2f}%" if "top5" in test else ""
        print(f"test: top1 {100 * test['top1']:.2f}%{top5}")
    elif test:
        print("test: " + ", ".join(f"{k} {v:.4g}" for k, v in test.items() if isinstance(v, (int, float))))
    else:
        for name, value in results.get("score", {}).items():  # the task's score when it has no test split
            print(f"score: {name} {value:.4g} (last evaluation, step {results.get('steps')}; all in metrics.jsonl)")
    for path in results.get("outputs", []):
        print(f"wrote {path}")
    counts = results.get("parameters")
    if counts and run_dir is not None and "steps" in results:
        share = 100 * counts["trainable"] / max(1, counts["total"])
        minutes = f", {seconds / 60:.1f} min" if seconds is not None else ""
        print(
            f"run: {run_dir} ({results['steps']} steps{minutes}; trainable {counts['trainable']:,} of "
            f"{counts['total']:,} parameters = {share:.3f}%; curves: tensorboard --logdir {run_dir})"
        )


def main(argv: list[str]) -> int:
    from ..registry import TRAINERS

    parser = argparse.ArgumentParser(
        prog="visionpeft train",
        description=__doc__,
        epilog="tasks (the config's task: key): " + ", ".join(TRAINERS.names()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="build model, method(s) and data; print the summary")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config with field help")
    parser.add_argument(
        "--push-to-hub",
        metavar="USER/REPO",
        help="upload the finished run (adapters, exported files, model card, pictures) to this hub model repo",
    )
    args = parser.parse_intermixed_args(argv)
    if args.push_to_hub:
        from ..checkpoint.hub_io import is_repo_id

        if not is_repo_id(args.push_to_hub):
            parser.error(f"--push-to-hub takes a hub repo id USER/REPO, got {args.push_to_hub!r}")
    with run_folder(args, parser, dry_run=args.dry_run or args.print_config) as (config, run_dir):
        if args.print_config:
            from ..config import describe_config

            print(describe_config(config), end="")
            return 0
        from ..config import RUN_COMMAND, task_spec

        RUN_COMMAND.set(["visionpeft", "train", *argv])
        configure_logging()
        start = time.perf_counter()
        train = task_spec(config.task).trainer()
        resume = args.resume is not None
        results = train(config, run_dir, resume=resume, dry_run=args.dry_run, stop_after=args.stop_after, cpu=args.cpu)
    report(results, run_dir, time.perf_counter() - start)
    if args.push_to_hub and not args.dry_run and (run_dir / "README.md").is_file():
        from ..trainers.run_card import push_run

        print(f"pushed {run_dir} to {args.push_to_hub}: {push_run(run_dir, args.push_to_hub)}")
    return 0
