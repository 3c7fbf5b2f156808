"""One run of a sweep: what it trains, the folder its identity names, its status, and the worker entry.

A run is identified by a stable hash of the sweep's base config content, its overrides, its seed and its stage; its
folder ``runs/<task>/<label>/<stage>-s<seed>-<hash>/`` holds ``run.json`` (what it is), ``log.txt``, the trainer's
run folder ``train/`` and, written last, ``result.json``: a folder with ``result.json`` is finished and is never run
again. The worker training a run holds the folder's lock (``run.lock``, :mod:`visionpeft.locks`): a second worker
leaves it alone. A failed run leaves ``error.txt`` (one line) and ``traceback.txt``; it runs again the next time the
sweep does (the failure may have been the machine's).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..io import atomic_write
from ..locks import FolderInUse, FolderLock

RESULT, ERROR, TRACEBACK, SPEC, LOG, TRAIN = "result.json", "error.txt", "traceback.txt", "run.json", "log.txt", "train"
#: the lock of a run folder held by the worker training it (``run.lock`` + ``run.lock.json``)
RUN_LOCK = "run"
#: the trainer's results, written by the main process of a launched (multi-process) run
LAUNCHED = "launched_results.json"


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs to train one run (plain values: it crosses process and machine boundaries).

    Attributes:
        config: The base config file (absolute path). overrides: ``key=value`` strings applied to it, in order.
        task, label, stage, seed: Where the run sits in the sweep (label: the grid's name, a report row).
        choices: ``[key, value]`` pairs of the grid point (reports show them). folder: The run's folder.
        processes: Processes the run trains in (one per GPU of a multi-GPU Slurm job): more than one launches
            the trainer with ``accelerate launch`` (CPU processes on gloo when there is no GPU). Not part of the
            run's identity: the same run on 1 or 8 GPUs has the same folder.
    """

    config: str
    overrides: tuple[str, ...]
    task: str
    label: str
    stage: str
    seed: int
    choices: tuple[tuple[str, str], ...]
    folder: str
    processes: int = 1

    @property
    def path(self) -> Path:
        return Path(self.folder)

    def name(self) -> str:
        point = ", ".join(f"{k}={v}" for k, v in self.choices)
        return f"{self.task}/{self.label} {self.stage} seed {self.seed}" + (f" [{point}]" if point else "")


def run_hash(config_digest: str, overrides: list[str] | tuple[str, ...], seed: int, stage: str) -> str:
    """12 hex digits naming a run: the same inputs give the same name on any machine, in any order of planning."""
    identity = json.dumps({"config": config_digest, "overrides": list(overrides), "seed": seed, "stage": stage})
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def config_digest(content: dict[str, Any]) -> str:
    """A digest of a config file's content (its ``_base_`` files merged in)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_result(folder: Path) -> dict[str, Any] | None:
    """The finished run's result, or None when it has not finished."""
    try:
        return json.loads((folder / RESULT).read_text())
    except (OSError, ValueError):
        return None


def read_error(folder: Path) -> str | None:
    """The one-line error of a failed run (None: it has not failed, or it was run again since)."""
    try:
        return (folder / ERROR).read_text().strip()
    except OSError:
        return None


def status(folder: Path) -> str:
    """``done``, ``failed`` or ``pending``."""
    if (folder / RESULT).is_file():
        return "done"
    return "failed" if (folder / ERROR).is_file() else "pending"


def _best_eval(log: Path, metric: str = "top1") -> float | None:
    """The best ``eval/<metric>`` in a run's ``metrics.jsonl``."""
    if not log.is_file():
        return None
    values = [json.loads(line).get(f"eval/{metric}") for line in log.read_text().splitlines() if line.strip()]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=1, default=str) + "\n"  # default=str: a trainer's results hold output paths
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _trainer(spec: RunSpec):
    """``(config, trainer)``: the run's config and its task's in-process ``run(config, run_dir)``."""
    from ..config import load_config, task_spec

    config = load_config(spec.config, list(spec.overrides))
    return config, task_spec(config.task).trainer()


def _train(spec: RunSpec, log_file) -> tuple[dict[str, Any], bool]:
    """Loads the run's config and calls its task's in-process trainer ``run(config, run_dir)``; returns its results
    and whether it evaluated on a validation split."""
    import contextlib
    import logging

    from omegaconf import OmegaConf

    config, trainer = _trainer(spec)
    validated = OmegaConf.select(config, "data.val_split") is not None
    if spec.processes > 1:
        return _launch(spec, log_file), validated
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("visionpeft")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
            return trainer(config, spec.path / TRAIN), validated
    finally:
        logger.removeHandler(handler)


def execute(run: RunSpec | dict[str, Any]) -> dict[str, Any]:
    """Trains one run unless it has finished; returns its record (``status`` done / failed, metrics, seconds).

    The worker entry of every executor. A failure is recorded in the run's folder and returned, never raised, so
    the rest of the sweep goes on. An unfinished run's partial folder is cleared and the run starts over.
    """
    spec = run if isinstance(run, RunSpec) else RunSpec(**run)
    done = read_result(spec.path)
    if done is not None:
        return {**done, "status": "done", "skipped": True}
    try:
        lock = FolderLock(spec.path, RUN_LOCK, "a sweep worker").acquire()
    except FolderInUse as err:  # another worker trains it (an earlier driver's): leave its folder alone
        return {"status": "failed", "error": str(err)}
    try:
        return _execute(spec)
    finally:
        lock.release()


def _execute(spec: RunSpec) -> dict[str, Any]:
    """:func:`execute` with the run folder's lock held."""
    folder = spec.path
    done = read_result(folder)  # again, under the lock: a worker that held it may have finished the run
    if done is not None:
        return {**done, "status": "done", "skipped": True}
    for name in (ERROR, TRACEBACK, TRAIN, LOG):
        target = folder / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / SPEC, asdict(spec))
    start = time.time()
    try:
        with open(folder / LOG, "w", buffering=1) as log_file:
            results, validated = _train(spec, log_file)
    except BaseException as err:  # a run's failure, whatever it is, is the run's result
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
        (folder / TRACEBACK).write_text(traceback.format_exc())
        (folder / ERROR).write_text(message + "\n")
        if isinstance(err, KeyboardInterrupt):
            raise
        return {"status": "failed", "error": message, "seconds": time.time() - start}
    counts = results.get("parameters", {})
    record = {
        "task": spec.task,
        "label": spec.label,
        "stage": spec.stage,
        "seed": spec.seed,
        "choices": [list(c) for c in spec.choices],
        "val": results.get("eval", {}) if validated else {},  # without a val split the loop evaluated on test
        "best_val_top1": _best_eval(folder / TRAIN / "metrics.jsonl") if validated else None,
        "test": results.get("test", {}),
        "test_new": results.get("test_new", {}),  # base-to-new: the new classes' test (the base ones': test)
        "trainable": counts.get("trainable"),
        "head": counts.get("by_group", {}).get("head", 0),
        "seconds": round(time.time() - start, 2),
        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),  # what the executor gave the worker
        "processes": results.get("world_size", 1),  # as the launched processes saw their group
    }
    _write_json(folder / RESULT, record)  # last: the marker of a finished run
    return {**record, "status": "done"}


def _launch(spec: RunSpec, log_file) -> dict[str, Any]:
    """Trains the run in ``spec.processes`` processes with ``accelerate launch`` (over the job's GPUs, or gloo CPU
    processes without one) running :func:`train_launched`; returns the main process's results."""
    import subprocess
    import sys

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < gpus < spec.processes:
        raise RuntimeError(f"the run asks for {spec.processes} processes but the job sees {gpus} GPU(s)")
    # --multi_gpu is accelerate's torch.distributed.run launcher: one process per GPU, or gloo CPU processes on a
    # machine without one (its --cpu flag would start a single process)
    # a port of its own: two jobs on one node (or two launches at once) must not meet at the default 29500
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(spec.processes),
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "visionpeft.sweep.runs",
        str(spec.path),
    ]
    (spec.path / LAUNCHED).unlink(missing_ok=True)
    done = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"accelerate launch with {spec.processes} processes exited with {done.returncode} (see {spec.path / LOG})"
        )
    return json.loads((spec.path / LAUNCHED).read_text())


def free_port() -> int:
    """A TCP port free on this machine now (the kernel's pick)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_launched(folder: str | Path) -> None:
    """The entry of each process of a launched run: trains the run whose ``run.json`` is in ``folder`` (accelerate
    reads the process group from the launcher's environment); the main process writes the results."""
    from accelerate import PartialState

    spec = RunSpec(**json.loads((Path(folder) / SPEC).read_text()))
    config, trainer = _trainer(spec)
    results = trainer(config, spec.path / TRAIN)
    state = PartialState()  # the process group the trainer's Accelerator joined
    if state.is_main_process:
        _write_json(spec.path / LAUNCHED, {**results, "world_size": state.num_processes})


if __name__ == "__main__":  # python -m visionpeft.sweep.runs RUN_FOLDER (what accelerate launch starts)
    import sys

    train_launched(sys.argv[1])
