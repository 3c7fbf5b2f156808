"""Apply a trained run to new inputs: ``visionpeft predict RUN_DIR [INPUT ...] --out OUT [options]``.

Rebuilds the run's model from its ``config.yaml`` (same pretrained weights), loads a saved adapter (default: ``best``,
else ``adapter``, else ``last``) and does what the run's task does with new inputs (the list below comes from the
task registry, ``visionpeft/config/tasks.py``; this command names no task). Every input is checked before the model
loads. Outputs never replace an input, and never an existing file unless --overwrite.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_base_check_argument, configure_logging, positive_int


def main(argv: list[str]) -> int:
    from ..config.tasks import commands_help

    parser = argparse.ArgumentParser(
        prog="visionpeft predict",
        description=__doc__,
        epilog=commands_help("predict"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, help="a run folder (config.yaml + saved adapters)")
    parser.add_argument("inputs", nargs="*", help="what the run's task takes (see below): image files or names")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="where the outputs go: a folder (a CSV file for tabular predictions)",
    )
    parser.add_argument("--checkpoint", default=None, help="the run's adapter folder (default: best, adapter, last)")
    parser.add_argument("--mode", choices=("whole", "slide"), default=None, help="default: the run's eval.mode")
    parser.add_argument("--top-k", type=positive_int, default=None, help="classes per image (default: 5)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: the config's eval_batch_size")
    parser.add_argument("--prompt", action="append", default=[], help="may be repeated (one for all, or one each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[], help="sampling seeds (default: the run's seed)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files (never an input)")
    parser.add_argument("--cpu", action="store_true", help="force the CPU even when a GPU is present")
    add_base_check_argument(parser)
    args = parser.parse_args(argv)

    from ..trainers.saved_run import PredictRequest, load_run

    config, spec = load_run(args.run_dir, "predict")
    options = {k: v for k, v in vars(args).items() if k not in ("run_dir", "ignore_base_mismatch")}
    predictor = spec.predict_function()  # a task without one says so first
    spec.check_options("predict", options)
    configure_logging()
    request = PredictRequest(args.run_dir, check_base=not args.ignore_base_mismatch, **options)
    for line in predictor(config, request):
        print(line)
    return 0
