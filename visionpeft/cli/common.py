"""Shared command-line plumbing: user mistakes become one line on stderr and exit code 2; library logs reach the
terminal through the ``visionpeft`` logger (main process only, see accelerate's logger)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


class _CurrentStream(logging.StreamHandler):
    """A ``StreamHandler`` that writes to whatever ``sys.stdout`` / ``sys.stderr`` is when a record comes, not the
    stream object that was there when it was made: a command run in-process under a redirect (pytest's capture, a
    caller's ``contextlib.redirect_stdout``) would otherwise leave a handler writing to a closed stream, and every later
    record in the process prints a ``--- Logging error ---`` traceback instead."""

    def __init__(self, name: str) -> None:
        self.name_of_stream = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self.name_of_stream)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ / setStream assign it: the lookup above wins
        pass


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
    handler = _CurrentStream("stdout")
    handler.setFormatter(logging.Formatter("%(message)s"))
    setattr(handler, _HANDLER, True)
    logger.addHandler(handler)
    if not root.handlers:
        others = _CurrentStream("stderr")
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


def unit_float(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {value}")
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
        help="delete an earlier run's own files in the run folder and start over there (refused for a folder "
        "that is not a run or holds other files; default: keep it and number the new run's folder: NAME-2, ...)",
    )


@contextlib.contextmanager
def run_folder(args, parser, dry_run: bool = False) -> Iterator[tuple[Any, Path]]:
    """``with run_folder(args, parser) as (config, run_dir):`` the config and folder of a training command, held
    while the run trains.

    A resumed run: its folder's newest complete state, its progress and ``metrics.jsonl`` checked before anything
    is built. A new run: its folder is claimed atomically (``mkdir``: two runs started at once with one name get
    ``NAME`` and ``NAME-2``; an existing folder is never a new run's), or with ``--overwrite`` the earlier run's own
    files are deleted first (a folder that is not a run by its own record, or holds anything else, is refused).
    The process training the run (under a launcher the main one, which picks the folder and broadcasts its name)
    holds the folder's lock (``run.lock``): a second process resuming or overwriting it is refused in one line. A
    claimed folder the run left without a config (it stopped on a mistake first) is removed again."""
    from ..trainers import run_state

    config, run_dir, lock, claimed = _resolve_run(args, parser, dry_run)
    try:
        yield config, run_dir
    finally:
        if lock is not None:
            lock.release()
            if claimed:
                run_state.discard_unused(run_dir)


def _resolve_run(args, parser, dry_run: bool):
    """(config, run folder, its lock or None, whether the folder was claimed for a new run) of a command."""
    from ..config import load_config
    from ..errors import ConfigError
    from ..trainers import run_state

    if args.stop_after is not None and args.stop_after < 1:
        raise ConfigError(
            f"--stop-after takes the number of epochs to train before stopping, at least 1, got {args.stop_after}"
        )
    if args.resume:
        if args.config or args.overrides or args.overwrite:
            raise ConfigError("--resume takes the run's own config.yaml; give no config, overrides or --overwrite")
        config_path = args.resume / run_state.CONFIG
        if run_state.newest_state(args.resume) is None or not config_path.is_file():
            raise ConfigError(f"{args.resume} is not a run folder with a saved state (config.yaml + state/)")
        config = load_config(config_path)
        if dry_run:
            return config, args.resume, None, False
        run_state.check_resumable(args.resume)
        lock = _run_lock(args.resume) if _is_main(args) else None
        return config, args.resume, lock, False
    if not args.config:
        parser.error("a config file is required (or --resume RUN_DIR)")
    report = [f"train.report_to={args.report_to}"] if args.report_to else []
    config = load_config(args.config, [*args.overrides, *report])
    run_dir = Path(config.train.output_dir) / config.train.run_name
    run_state.check_name_length(run_dir)
    if dry_run:
        return config, run_dir, None, False
    from ..trainers.loop import launched  # imports torch: not before the config has been checked

    several, cpu = launched(args.cpu)
    if not several:
        return _claim(config, run_dir, args.overwrite)
    # launched processes: the main one decides (a folder the others would see half-made), the others follow it
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list
    from omegaconf import read_write

    decided, held = [None], (None, False)
    if PartialState(cpu=cpu).is_main_process:
        config, run_dir, *held = _claim(config, run_dir, args.overwrite)
        decided = [config.train.run_name]
    broadcast_object_list(decided)
    with read_write(config):
        config.train.run_name = decided[0]
    return config, run_dir.parent / decided[0], *held


def _is_main(args) -> bool:
    """Whether this process is the one that holds the run folder (the main one under a launcher)."""
    from ..trainers.loop import launched

    several, cpu = launched(args.cpu)
    if not several:
        return True
    from accelerate import PartialState

    return PartialState(cpu=cpu).is_main_process


def _run_lock(run_dir: Path):
    from ..locks import FolderLock
    from ..trainers import run_state

    return FolderLock(run_dir, run_state.RUN_LOCK, "a training run").acquire()


def _claim(config, run_dir: Path, overwrite: bool):
    """(config, run folder, its lock, claimed) of a new run: ``run_dir`` emptied by ``--overwrite``, or a folder
    claimed by :func:`~visionpeft.trainers.run_state.claim_new_folder` (``run_dir`` or a numbered one beside it)."""
    from omegaconf import read_write

    from ..trainers import run_state

    run_state.check_writable(run_dir)
    if overwrite and run_dir.is_dir():
        run_state.check_overwrite(run_dir)  # a refusal leaves no lock file in someone else's folder
        lock = _run_lock(run_dir)
        try:
            if run_state.delete_run(run_dir):
                print(f"--overwrite: deleted the earlier run in {run_dir}", file=sys.stderr)
        except BaseException:
            lock.release()
            raise
        return config, run_dir, lock, False
    folder = run_state.claim_new_folder(run_dir)
    lock = _run_lock(folder)
    if folder != run_dir:
        with read_write(config):
            config.train.run_name = folder.name
        earlier = (
            f"holds an earlier run (kept; --resume {run_dir} continues it)"
            if run_state.newest_state(run_dir) is not None
            else "exists (kept; --overwrite replaces a run there)"
        )
        print(f"{run_dir} {earlier}; this run goes to {folder}", file=sys.stderr)
    return config, folder, lock, True
