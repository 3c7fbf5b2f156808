"""Evaluate a finished (or saved) run: ``visionpeft eval RUN_DIR [--checkpoint NAME] [options]``.

Rebuilds the run's model from its ``config.yaml`` (same pretrained weights), loads a saved adapter (default: ``best``,
else ``adapter``, else ``last``) and evaluates it as the run's task does (the list below comes from the task
registry, ``visionpeft/config/tasks.py``; this command names no task). Generated images go into --out (a new or
empty folder; default RUN/eval/<adapter>, numbered beside earlier ones). An option that does not apply to the run's
task, or a folder that is not a run, is one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_base_check_argument, configure_logging, positive_int


def main(argv: list[str]) -> int:
    from ..config.tasks import commands_help

    parser = argparse.ArgumentParser(
        prog="visionpeft eval",
        description=__doc__,
        epilog=commands_help("eval"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, help="a run folder (config.yaml + saved adapters)")
    parser.add_argument("--checkpoint", default=None, help="the run's adapter folder (default: best, adapter, last)")
    parser.add_argument("--split", default=None, help="dataset split (default: the config's test split)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: the config's eval_batch_size")
    parser.add_argument("--mode", choices=("whole", "slide"), default=None, help="default: the config's eval.mode")
    parser.add_argument("--samples", type=positive_int, default=None, help="images to generate (default: the run's)")
    parser.add_argument("--clip", default=None, help="CLIP for CLIP-T / CLIP-I: NAME:TAG, NAME=FILE or none")
    parser.add_argument("--out", type=Path, default=None, help="folder receiving generated images")
    parser.add_argument("--cpu", action="store_true", help="force the CPU even when a GPU is present")
    add_base_check_argument(parser)
    args = parser.parse_args(argv)

    from ..trainers.saved_run import EvalRequest, check_eval_out, load_run

    config, spec = load_run(args.run_dir, "eval")
    options = {k: v for k, v in vars(args).items() if k not in ("run_dir", "ignore_base_mismatch")}
    spec.check_options("eval", options)
    check_eval_out(args.out)
    configure_logging()
    request = EvalRequest(args.run_dir, check_base=not args.ignore_base_mismatch, **options)
    for line in spec.evaluate_function()(config, request):
        print(line)
    return 0
