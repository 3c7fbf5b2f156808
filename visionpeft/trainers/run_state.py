"""The resumable state of a run folder: written so that no crash loses the last complete state, read so that
nothing in it can run code.

A state is a folder (``state/``) of accelerate's files (trained tensors in safetensors; optimizer, scheduler and
random states that accelerate loads with ``torch.load(weights_only=True)``), the EMA in ``ema.safetensors`` and
``progress.json``, written last: a state folder is complete exactly when it holds ``progress.json``. A save writes
``state.tmp/``, then renames ``state/`` to ``state.old/`` and ``state.tmp/`` to ``state/``, then deletes
``state.old/``; :func:`recover_state` finishes or rolls back a save interrupted at any of those moments. A damaged
``progress.json`` or ``metrics.jsonl`` line is one line naming the file (and an intact earlier state beside it).

The folder itself: a new run's folder is claimed by creating it (:func:`claim_new_folder`: ``NAME``, else
``NAME-2``, ...; two runs started at once never share one); a folder is a run by its own record, the
``config.yaml`` visionpeft wrote (:func:`is_run`), and ``--overwrite`` deletes only such a run and only its own
files (:data:`RUN_OUTPUTS`, :func:`check_overwrite`); the process training a run holds ``run.lock``
(:mod:`visionpeft.locks`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..io import atomic_write
from ..locks import lock_files

logger = logging.getLogger(__name__)

STATE, TMP, OLD = "state", "state.tmp", "state.old"
PROGRESS = "progress.json"
EMA_FILE = "ema.safetensors"
CHECKPOINTS = "checkpoints"
CONFIG = "config.yaml"
#: the first line of a run's ``config.yaml`` (``config.save_config``): a folder is a run by this record
CONFIG_HEADER = "# made by visionpeft "
#: the lock the process training a run holds on its folder (``run.lock`` + ``run.lock.json``)
RUN_LOCK = "run"
#: every name a run (its trainer, its task, its trackers, ``eval``) writes at the top of its folder:
#: ``--overwrite`` deletes these and nothing else (``tests/test_run_folder.py`` checks the trainers write no other)
RUN_OUTPUTS = frozenset(
    {
        CONFIG,
        "metrics.jsonl",
        STATE,
        TMP,
        OLD,
        "last",
        "best",
        CHECKPOINTS,
        "README.md",
        "tensorboard",
        "wandb",
        "validation",
        "adapter",
        "diffusers",
        "merged",
        "class_images",
        "per_class_iou.md",
        "predictions.png",
        "vae",
        "pipeline",
        "model",  # pretrain_clip: the open_clip folder
        "earlier_training.json",
        "wall_minutes.json",
        "vae_normalisation.json",  # pretrain_text_to_image, family flux: the VAE's latent shift and scale
        "t5_tokenizer",  # ... and the offline T5 tokenizer it built
        "history.txt",  # ... and the sessions of an interrupted run (its card's history line)
        "eval",
        "noah_search",  # `visionpeft noah RUN_DIR`'s search of a supernet run: stale once the run trains again
        *lock_files(RUN_LOCK),
    }
)
#: the longest ``-N`` a numbered run folder adds to ``train.run_name`` (kept free under the file system's limit)
SUFFIX_ROOM = len("-999")


def is_complete(folder: Path) -> bool:
    return (folder / PROGRESS).is_file()


def is_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a run by its own record: its ``config.yaml`` was written by visionpeft (a file merely
    named so, or other files a run would write, do not make a folder a run)."""
    try:
        with open(run_dir / CONFIG, encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(CONFIG_HEADER)
    except OSError:
        return False


def is_run_output(name: str) -> bool:
    """Whether a name at the top of a run folder is the run's own: one of :data:`RUN_OUTPUTS`, or what an atomic
    write of one leaves when it is killed (``.config.yaml.x1y2.tmp``)."""
    if name in RUN_OUTPUTS:
        return True
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in RUN_OUTPUTS)


def check_name_length(run_dir: Path) -> None:
    """Raises a :class:`ConfigError` when ``train.run_name`` is longer than the file system takes, with room for
    the ``-N`` of a numbered folder (checked before anything is built)."""
    folder = run_dir.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(run_dir.name))
    if size > limit - SUFFIX_ROOM:
        raise ConfigError(
            f"train.run_name is {size} bytes long; the file system of {folder} takes names of up to {limit} bytes, "
            f"so a run name may have {limit - SUFFIX_ROOM} (room for a -N suffix)"
        )


def claim_new_folder(run_dir: Path) -> Path:
    """Creates and returns the folder of a new run: ``run_dir``, or the first of ``NAME-2``, ``NAME-3``, ... beside
    it that does not exist. Creating the folder is the claim (``mkdir`` fails for all but one process), so two runs
    started at once with one name get two folders; an existing folder, whatever it holds, is never a new run's."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        folder = run_dir if number == 1 else run_dir.with_name(f"{run_dir.name}-{number}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1


def discard_unused(run_dir: Path) -> None:
    """Removes a claimed folder that the run left holding nothing but its lock (it stopped on a mistake before
    writing its config), so a refused command leaves no folder behind."""
    own = set(lock_files(RUN_LOCK))
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return
    if all(entry.name in own for entry in entries):
        for entry in entries:
            entry.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()


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


def check_overwrite(run_dir: Path) -> list[Path]:
    """The entries ``--overwrite`` would delete in ``run_dir`` (none: the folder is empty). Only a run by its own
    record (:func:`is_run`) is deleted, and only its own files (:func:`is_run_output`): a folder holding anything
    else is a :class:`ConfigError` naming what."""
    entries = [e for e in run_dir.iterdir() if e.name not in lock_files(RUN_LOCK)]
    if not entries:
        return []
    if not is_run(run_dir) or run_dir.resolve() == Path.cwd().resolve():
        raise ConfigError(
            f"--overwrite refused: {run_dir} is not a run folder (no {CONFIG} written by visionpeft) and is not "
            "empty; --overwrite deletes run folders only (choose another train.run_name)"
        )
    foreign = sorted(e.name for e in entries if not is_run_output(e.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(
            f"--overwrite refused: {run_dir} holds files that are not the run's ({shown}); move them elsewhere "
            "and try again (nothing was deleted)"
        )
    return entries


def delete_run(run_dir: Path) -> bool:
    """``--overwrite``: deletes the run in ``run_dir`` as :func:`check_overwrite` allows (the caller holds the
    folder's lock); returns whether there was one."""
    entries = check_overwrite(run_dir)
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return bool(entries)


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
    if old.exists() and (progress_problem(final) is None or progress_problem(old) is not None):
        shutil.rmtree(old)  # kept beside a damaged state/: read_progress offers it


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


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


#: what ``progress.json`` holds (the loop's position and the best evaluation so far) -> (check, in words)
PROGRESS_FIELDS = {
    "epoch": (_count, "a count"),
    "step": (_count, "a count"),
    "batch_in_epoch": (_count, "a count"),
    "best": (_number, "a number"),
    "epoch_loss": (
        lambda v: isinstance(v, list) and len(v) == 2 and _number(v[0]) and _count(v[1]),
        "a [loss sum, batches] pair",
    ),
}


def progress_problem(folder: Path) -> str | None:
    """What is wrong with a state's ``progress.json`` (``lacks 'best'``), or None when it can be resumed from."""
    try:
        progress = json.loads((folder / PROGRESS).read_text())
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    except ValueError:
        return "is not JSON"
    if not isinstance(progress, dict):
        return "is not a JSON object"
    for key, (valid, words) in PROGRESS_FIELDS.items():
        if key not in progress:
            return f"lacks '{key}'"
        if not valid(progress[key]):
            return f"has '{key}': {json.dumps(progress[key])[:40]}, which is not {words}"
    return None


def _intact_alternative(folder: Path) -> str:
    """``; the previous complete state ... is intact: ...`` when another state beside ``folder`` can be resumed."""
    for other in (folder.parent / name for name in (TMP, STATE, OLD)):
        if other != folder and is_complete(other) and progress_problem(other) is None:
            step = json.loads((other / PROGRESS).read_text())["step"]
            return (
                f"; the previous complete state {other} (step {step}) is intact: move {folder} away and rename "
                f"{other} to {folder.parent / STATE} to resume from it"
            )
    return ""


def read_progress(folder: Path) -> dict[str, Any]:
    """A state's ``progress.json``; a :class:`CheckpointError` naming the file (and an intact earlier state, if
    one is beside it) when it is damaged."""
    problem = progress_problem(folder)
    if problem is not None:
        raise CheckpointError(
            f"{folder / PROGRESS} {problem}: the state cannot be resumed{_intact_alternative(folder)}"
        )
    return json.loads((folder / PROGRESS).read_text())


def check_resumable(run_dir: Path) -> None:
    """Reads what a resume of ``run_dir`` will read (the newest state's progress, ``metrics.jsonl``) and raises a
    :class:`CheckpointError` naming the damaged file, before anything is built."""
    state = newest_state(run_dir)
    if state is None:
        raise CheckpointError(f"{run_dir} holds no complete saved state to resume from")
    read_progress(state)
    read_metrics(run_dir / "metrics.jsonl")


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


def read_metrics(log: Path) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
    """``(line, record)`` of every record in ``metrics.jsonl`` and whether its last line is torn (the process died
    while appending it). A line elsewhere that is not a record (a JSON object with a numeric ``step``) is a
    :class:`CheckpointError` naming the file and the line."""
    if not log.exists():
        return [], False
    lines = log.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                return records, True
            raise CheckpointError(f"{log} line {number} is not a JSON record; fix or delete that line") from None
        if not isinstance(record, dict) or not _number(record.get("step", 0)):
            raise CheckpointError(
                f"{log} line {number} is not a metrics record (a JSON object with a numeric step); fix or delete "
                "that line"
            )
        records.append((line, record))
    return records, False


def trim_metrics(log: Path, step: int) -> None:
    """Keeps the records up to ``step`` (those after it are redone). A torn final line (the process died while
    appending) is dropped with a warning; a damaged line elsewhere is an error naming it."""
    if not log.exists():
        return
    records, torn = read_metrics(log)
    if torn:
        logger.warning(f"{log}: dropped a torn last line (the run stopped while writing it)")
    kept = [line for line, record in records if record.get("step", 0) <= step]
    atomic_write(log, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))
