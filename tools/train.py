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
from pathlib import Path

from _cli import run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--resume", type=Path, help="continue the run in this folder from its last epoch")
    parser.add_argument("--dry-run", action="store_true", help="build model, method and data; print the summary")
    parser.add_argument("--stop-after", type=int, help="train at most this many epochs now (resume later)")
    parser.add_argument("--cpu", action="store_true", help="force the CPU even when a GPU is present")
    args = parser.parse_intermixed_args(argv)

    from visionpeft.config import load_config
    from visionpeft.errors import ConfigError
    from visionpeft.trainers.classification import run as train

    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume takes the run's own config.yaml; give no config or overrides")
        config_path = args.resume / "config.yaml"
        if not (args.resume / "state").is_dir() or not config_path.is_file():
            raise ConfigError(f"{args.resume} is not a run folder with a saved state (config.yaml + state/)")
        config, run_dir = load_config(config_path), args.resume
    else:
        if not args.config:
            parser.error("a config file is required (or --resume RUN_DIR)")
        config = load_config(args.config, args.overrides)
        run_dir = Path(config.train.output_dir) / config.train.run_name
        if not args.dry_run and (run_dir / "state").exists():
            raise ConfigError(f"{run_dir} already holds a run; use --resume {run_dir} or another train.run_name")
    train(config, run_dir, resume=args.resume is not None, dry_run=args.dry_run, stop_after=args.stop_after,
          cpu=args.cpu)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
