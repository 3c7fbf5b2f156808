"""Shared command-line plumbing: user mistakes become one line on stderr and exit code 2; library logs reach the
terminal through the ``visionpeft`` logger (main process only, see accelerate's logger)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

_HANDLER = "_visionpeft_cli"


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Calls ``main(argv)``; a :class:`visionpeft.VisionPEFTError` prints ``error: ...`` and returns 2."""
    from ..errors import VisionPEFTError

    try:
        return main(sys.argv[1:] if argv is None else argv) or 0
    except VisionPEFTError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def configure_logging(level: int = logging.INFO) -> None:
    """Sends the ``visionpeft`` loggers' records to stdout as plain lines (one handler, however often called).

    Other libraries' warnings go to stderr as plain lines through a root handler that leaves ``visionpeft``'s out.
    Without one, a library's bare ``logging.info(...)`` (open_clip's) runs ``logging.basicConfig``, whose root handler
    would print every ``visionpeft`` line a second time as ``INFO:visionpeft...``."""
    logger = logging.getLogger("visionpeft")
    logger.setLevel(level)
    root = logging.getLogger()
    for owner in (logger, root):
        for handler in [h for h in owner.handlers if getattr(h, _HANDLER, False)]:
            owner.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    setattr(handler, _HANDLER, True)
    logger.addHandler(handler)
    if not root.handlers:
        others = logging.StreamHandler(sys.stderr)
        others.setLevel(logging.WARNING)
        others.addFilter(lambda record: not record.name.startswith("visionpeft"))
        setattr(others, _HANDLER, True)
        root.addHandler(others)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_base_check_argument(parser) -> None:
    """``--ignore-base-mismatch``: load an adapter onto other base weights than those it was trained on."""
    parser.add_argument(
        "--ignore-base-mismatch",
        action="store_true",
        help="load adapters even onto other base weights than they were trained on",
    )


def add_run_arguments(parser) -> None:
    """The arguments of a training command: CONFIG [key=value ...] | --resume RUN_DIR, --stop-after, --cpu."""
    parser.add_argument("config", nargs="?", help="run config (YAML; its task: key picks the trainer)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys, e.g. optim.lr=0.01)")
    parser.add_argument("--resume", type=Path, help="continue the run in this folder from its saved state")
    parser.add_argument("--stop-after", type=int, help="stop after this many more epochs (resume later)")
    parser.add_argument("--cpu", action="store_true", help="force the CPU even when a GPU is present")
    parser.add_argument(
        "--report-to", choices=("tensorboard", "wandb", "none"), help="experiment tracker (same as train.report_to=...)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an earlier run in the run folder and start over there (default: keep it and "
        "number the new run's folder: NAME-2, NAME-3, ...)",
    )


def resolve_run(args, parser, dry_run: bool = False):
    """(config, run folder) from the parsed arguments: a resumed run (the folder's newest complete state) or a new
    one. A new run never writes into a folder holding another run: it gets the next free numbered folder
    (``NAME-2``, ``NAME-3``, ...), or, with ``--overwrite``, the earlier run is deleted first."""
    from ..config import load_config
    from ..errors import ConfigError
    from ..trainers import run_state

    if args.resume:
        if args.config or args.overrides or args.overwrite:
            raise ConfigError("--resume takes the run's own config.yaml; give no config, overrides or --overwrite")
        config_path = args.resume / "config.yaml"
        if run_state.newest_state(args.resume) is None or not config_path.is_file():
            raise ConfigError(f"{args.resume} is not a run folder with a saved state (config.yaml + state/)")
        return load_config(config_path), args.resume
    if not args.config:
        parser.error("a config file is required (or --resume RUN_DIR)")
    report = [f"train.report_to={args.report_to}"] if args.report_to else []
    config = load_config(args.config, [*args.overrides, *report])
    run_dir = Path(config.train.output_dir) / config.train.run_name
    if dry_run:
        return config, run_dir
    from ..trainers.loop import launched  # imports torch: not before the config has been checked

    several, cpu = launched(args.cpu)
    if not several:
        return _new_run_folder(config, run_dir, args.overwrite)
    # launched processes: the main one decides (a folder the others would see half-made), the others follow it
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list
    from omegaconf import read_write

    decided = [None]
    if PartialState(cpu=cpu).is_main_process:
        decided = [_new_run_folder(config, run_dir, args.overwrite)[0].train.run_name]
    broadcast_object_list(decided)
    with read_write(config):
        config.train.run_name = decided[0]
    return config, run_dir.parent / decided[0]


def _new_run_folder(config, run_dir: Path, overwrite: bool):
    """(config, run folder) of a new run: ``run_dir``, or ``run_dir`` emptied by ``--overwrite``, or the next free
    numbered folder beside it."""
    from ..trainers import run_state

    if not run_state.holds_run(run_dir):
        return config, run_dir
    if overwrite:
        run_state.delete_run(run_dir)
        print(f"--overwrite: deleted the earlier run in {run_dir}", file=sys.stderr)
        return config, run_dir
    name = config.train.run_name
    number = 2
    while run_state.holds_run(run_dir.parent / f"{name}-{number}"):
        number += 1
    from omegaconf import read_write

    with read_write(config):
        config.train.run_name = f"{name}-{number}"
    print(
        f"{run_dir} holds an earlier run (kept; --resume {run_dir} continues it); "
        f"this run goes to {run_dir.parent / config.train.run_name}",
        file=sys.stderr,
    )
    return config, run_dir.parent / config.train.run_name
