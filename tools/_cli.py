"""Shared command-line plumbing: user mistakes become one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Calls ``main(argv)``; a :class:`visionpeft.VisionPEFTError` prints ``error: ...`` and returns 2."""
    from visionpeft.errors import VisionPEFTError

    try:
        return main(sys.argv[1:] if argv is None else argv) or 0
    except VisionPEFTError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def add_run_arguments(parser) -> None:
    """The arguments every training tool takes: CONFIG [key=value ...] | --resume RUN_DIR, --stop-after, --cpu."""
    parser.add_argument("config", nargs="?", help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--resume", type=Path, help="continue the run in this folder from its saved state")
    parser.add_argument("--stop-after", type=int, help="train at most this many epochs now (resume later)")
    parser.add_argument("--cpu", action="store_true", help="force the CPU even when a GPU is present")


def resolve_run(args, parser, schema_class=None, dry_run: bool = False):
    """(config, run folder) from the parsed arguments: a new run (never over an existing one) or a resumed one."""
    from visionpeft.config import load_config
    from visionpeft.errors import ConfigError

    kwargs = {"schema_class": schema_class} if schema_class is not None else {}
    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume takes the run's own config.yaml; give no config or overrides")
        config_path = args.resume / "config.yaml"
        if not (args.resume / "state").is_dir() or not config_path.is_file():
            raise ConfigError(f"{args.resume} is not a run folder with a saved state (config.yaml + state/)")
        return load_config(config_path, **kwargs), args.resume
    if not args.config:
        parser.error("a config file is required (or --resume RUN_DIR)")
    config = load_config(args.config, args.overrides, **kwargs)
    run_dir = Path(config.train.output_dir) / config.train.run_name
    if not dry_run and (run_dir / "state").exists():
        raise ConfigError(f"{run_dir} already holds a run; use --resume {run_dir} or another train.run_name")
    return config, run_dir


def run_trainer(argv: list[str], doc: str, schema_class, trainer) -> int:
    """The whole of a diffusion training tool: parse, resolve the run, train, list what was written."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    config, run_dir = resolve_run(args, parser, schema_class)
    result = trainer(config, run_dir, resume=args.resume is not None, cpu=args.cpu, stop_after=args.stop_after)
    for path in result["outputs"]:
        print(f"wrote {path}")
    return 0
