"""The resumable state of a run folder: written so that no crash loses the last complete state, read so that
nothing in it can run code.

A state is a folder (``state/``) of accelerate's files (trained tensors in safetensors; optimizer, scheduler and
random states that accelerate loads with ``torch.load(weights_only=True)``), the EMA in ``ema.safetensors`` and
``progress.json``, written last: a state folder is complete exactly when it holds ``progress.json``. A save writes
``state.tmp/``, then renames ``state/`` to ``state.old/`` and ``state.tmp/`` to ``state/``, then deletes
``state.old/``; :func:`recover_state` finishes or rolls back a save interrupted at any of those moments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..io import atomic_write

logger = logging.getLogger(__name__)

STATE, TMP, OLD = "state", "state.tmp", "state.old"
PROGRESS = "progress.json"
EMA_FILE = "ema.safetensors"
#: what makes a folder a run (a new run never writes into a folder holding any of them)
RUN_FILES = ("config.yaml", "metrics.jsonl", STATE, TMP, OLD, "last")


def is_complete(folder: Path) -> bool:
    return (folder / PROGRESS).is_file()


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds (part of) a run."""
    return any((run_dir / name).exists() for name in RUN_FILES)


CHECKPOINTS = "checkpoints"


def keep_step_checkpoint(run_dir: Path, step: int, limit: int | None) -> Path:
    """Copies the adapter just saved in ``last/`` to ``checkpoints/step-NNNNNNN/`` and deletes the oldest step
    checkpoints beyond ``limit`` (diffusers' ``checkpoints_total_limit``); the resumable state is ``state/``."""
    folder = run_dir / CHECKPOINTS / f"step-{step:07d}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir / "last", tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    kept = sorted(p for p in folder.parent.glob("step-*") if not p.name.endswith(".tmp"))
    for old in kept[: max(0, len(kept) - limit)] if limit else []:
        shutil.rmtree(old)
    return folder


def delete_run(run_dir: Path) -> None:
    """Deletes the run folder ``run_dir`` (``--overwrite``); refuses a folder that holds no run."""
    if not holds_run(run_dir) or run_dir.resolve() == Path.cwd().resolve():
        raise ConfigError(f"{run_dir} holds no run; --overwrite deletes run folders only")
    shutil.rmtree(run_dir)


def newest_state(run_dir: Path) -> Path | None:
    """The complete state a resume would use, without changing anything (``state.tmp`` wins when a save finished
    writing it but died before renaming)."""
    for name in (TMP, STATE, OLD):
        if is_complete(run_dir / name):
            return run_dir / name
    return None


def recover_state(run_dir: Path) -> None:
    """Finishes a save that completed ``state.tmp`` or rolls back one that did not, so that ``state/`` is the newest
    complete state if there is one (main process only: it renames and deletes folders)."""
    final, tmp, old = run_dir / STATE, run_dir / TMP, run_dir / OLD
    if is_complete(tmp):
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
    elif tmp.exists():
        shutil.rmtree(tmp)  # an unfinished save: the previous state stands
    if not final.exists() and is_complete(old):
        old.rename(final)
    if old.exists():
        shutil.rmtree(old)


def commit_state(run_dir: Path) -> None:
    """Makes the complete ``state.tmp`` the run's state (the last step of a save)."""
    final, tmp, old = run_dir / STATE, run_dir / TMP, run_dir / OLD
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def check_writable(run_dir: Path) -> None:
    """Raises a :class:`ConfigError` unless the run folder can be created and written (checked before any model is
    built, so a read-only or missing disk is one line, not a failure after an epoch)."""
    folder = run_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a folder")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(f"cannot write the run folder {run_dir}: {err.strerror or err}") from None


def rng_digest() -> str:
    """A fingerprint of the CPU random state, to tell whether a resume restored it."""
    import torch

    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]


def write_progress(folder: Path, progress: dict[str, Any]) -> None:
    atomic_write(folder / PROGRESS, lambda tmp: Path(tmp).write_text(json.dumps(progress)))


def read_progress(folder: Path) -> dict[str, Any]:
    try:
        progress = json.loads((folder / PROGRESS).read_text())
        _ = progress["epoch"], progress["step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{folder / PROGRESS} is damaged ({type(err).__name__}); the state cannot be resumed"
        ) from None
    return progress


def save_ema(ema: Any, folder: Path) -> dict[str, Any]:
    """Writes the EMA's averages as safetensors; returns its scalar settings (for ``progress.json``)."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    tensors = {f"shadow.{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(state.pop("shadow_params"))}
    save_file(tensors, str(folder / EMA_FILE))
    return state


def load_ema(ema: Any, folder: Path, settings: dict[str, Any] | None) -> None:
    """Restores an EMA saved by :func:`save_ema` (a state without one is an error: the run used an EMA)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / EMA_FILE
    if settings is None or not path.is_file():
        raise CheckpointError(f"{folder} holds no EMA, but this run keeps one (train.ema_decay)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None
    shadow = [tensors.get(f"shadow.{i}") for i in range(len(ema.shadow_params))]
    if any(t is None for t in shadow) or len(tensors) != len(shadow):
        raise CheckpointError(f"{path} does not fit this run's trained parameters")
    ema.load_state_dict({**settings, "shadow_params": shadow})


def trim_metrics(log: Path, step: int) -> None:
    """Keeps the records up to ``step`` (those after it are redone). A torn final line (the process died while
    appending) is dropped with a warning; a damaged line elsewhere is an error naming it."""
    if not log.exists():
        return
    lines = log.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                logger.warning(f"{log}: dropped a torn last line (the run stopped while writing it)")
                break
            raise CheckpointError(f"{log} line {number} is not a JSON record; fix or delete that line") from None
        if record.get("step", 0) <= step:
            kept.append(line)
    atomic_write(log, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))
