"""Train a method on an image-classification task.

    python tools/train.py CONFIG [key=value ...] [--dry-run] [--stop-after N]
    python tools/train.py --resume RUN_DIR
    accelerate launch --num_processes 2 tools/train.py CONFIG ...      # several GPUs / processes

CONFIG is a YAML file (``_base_`` inheritance); ``key=value`` overrides any entry (``optim.lr=0.01``,
``method.num_tokens=10``). The run folder (``train.output_dir/train.run_name``) receives the resolved
``config.yaml``, ``metrics.jsonl``, TensorBoard logs, the ``last`` / ``best`` adapters and the resumable state.
"""

from __future__ import annotations

import argparse
import sys

from _cli import add_run_arguments, resolve_run, run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="build model, method and data; print the summary")
    args = parser.parse_intermixed_args(argv)

    from visionpeft.trainers.classification import run as train

    config, run_dir = resolve_run(args, parser, dry_run=args.dry_run)
    train(config, run_dir, resume=args.resume is not None, dry_run=args.dry_run, stop_after=args.stop_after,
          cpu=args.cpu)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
