"""Executors: run a list of :class:`~.runs.RunSpec` with an existing engine, each run through :func:`~.runs.execute`.

* ``local``: a process pool (``concurrent.futures`` with spawned processes); each worker sees one GPU through
  ``CUDA_VISIBLE_DEVICES`` when there are GPUs, else the CPU threads are shared out between the workers.
* ``slurm``: submitit, one job array with at most ``workers`` jobs running at once, a multi-GPU job training its
  run with ``accelerate launch`` over the job's GPUs (``cluster: local`` / ``debug`` run submitit's local or
  in-process executors, for tests and debugging).
* ``ray``: Ray core tasks on the cluster at ``address`` (none: a local cluster), one GPU each when asked.

An executor's ``run(runs, on_done)`` blocks until every run has finished or failed, calls ``on_done(run, record)``
as each one does, and returns the records. A run's failure is its record (``status: failed``), never an exception.
``run(jobs, on_done, worker)`` sends other jobs the same way: ``worker(asdict(job))`` (a module-level function; the
local pool and submitit also take a partial of one) returns the job's record, and a job has the ``path`` of its
folder, where ``result.json`` marks it done (NOAH's search scores its candidates so, :mod:`.noah_jobs`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .runs import ERROR, RunSpec, execute, read_result

OnDone = Callable[[RunSpec, dict[str, Any]], None]
#: what a worker process calls with a job's fields (``runs.execute`` for a run), returning the job's record
Worker = Callable[[dict[str, Any]], dict[str, Any]]
#: executor -> (module it needs, the pyproject extra that installs it)
EXTRAS = {"slurm": ("submitit", "slurm"), "ray": ("ray", "ray")}


def require_extra(executor: str) -> None:
    """A :class:`ConfigError` naming the ``pip install`` line when the executor's engine is not installed."""
    if executor in EXTRAS:
        module, extra = EXTRAS[executor]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f'the {executor} executor needs {module}: pip install "visionpeft[{extra}]"')


def _lost(run: RunSpec, err: BaseException) -> dict[str, Any]:
    """The record of a run whose worker died or whose job was lost (the run's own failures are caught inside)."""
    result = read_result(run.path)
    if result is not None:
        return {**result, "status": "done"}
    message = f"the worker running it was lost: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    run.path.mkdir(parents=True, exist_ok=True)
    (run.path / ERROR).write_text(message + "\n")
    return {"status": "failed", "error": message}


def _visible_gpus() -> list[str]:
    """The GPUs this process may use (``CUDA_VISIBLE_DEVICES`` order), none without CUDA."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


def _end_family(signum: int = 0, frame: Any = None) -> None:
    """Ends this worker and every process it started (DataLoader workers, a launched trainer): they would go on
    training in a run folder that the next start of the sweep clears."""
    import psutil  # accelerate's dependency

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    os._exit(128 + (signum or 1))


def die_with_driver(driver: int) -> None:
    """Linux: ends this worker and its own children when the sweep driver (pid ``driver``) dies, ``kill -9``
    included. The kernel sends the worker SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``; the standard
    library has no wrapper), and the worker's handler ends the processes it started before it exits: the death
    signal is not inherited, so a DataLoader worker (a spawned process whose queue holds its own pipe ends) would
    outlive it. A driver that died before the signal was armed (while the worker was starting) is caught by the
    parent check after arming. Elsewhere a no-op: Ctrl-C reaches the whole process group anyway."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    signal.signal(signal.SIGTERM, _end_family)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != driver:  # the driver died before the signal was armed
        _end_family(signal.SIGTERM)


def _init_worker(devices, threads: int, driver: int) -> None:
    """Runs first in each local worker: tie it to the driver's life, then claim a GPU (before torch sees CUDA) or a
    share of the CPU threads."""
    die_with_driver(driver)
    device = devices.get()
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    import torch

    torch.set_num_threads(threads)


@dataclass
class LocalExecutor:
    """``workers`` spawned processes on this machine (default: one per GPU, or one)."""

    workers: int | None = None

    def run(self, runs: list[RunSpec], on_done: OnDone, worker: Worker = execute) -> list[dict[str, Any]]:
        gpus = _visible_gpus()
        workers = min(self.workers or max(1, len(gpus)), max(1, len(runs)))
        context = multiprocessing.get_context("spawn")
        devices = context.Queue()
        for index in range(workers):
            devices.put(gpus[index % len(gpus)] if gpus else None)
        threads = max(1, (os.cpu_count() or 1) // workers)
        records = []
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(devices, threads, os.getpid())
        ) as pool:
            futures = {pool.submit(worker, asdict(run)): run for run in runs}
            try:
                for future in as_completed(futures):
                    run = futures[future]
                    try:
                        record = future.result()
                    except Exception as err:  # the worker process died (killed, out of memory)
                        record = _lost(run, err)
                    on_done(run, record)
                    records.append(record)
            except KeyboardInterrupt:  # stop now: runs not started stay pending, the next start runs them
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        return records


@dataclass
class SubmititExecutor:
    """A submitit job array: one job per run, at most ``workers`` at once.

    Attributes:
        folder: Where submitit keeps its job files and logs. cluster: ``None`` (detect Slurm), ``slurm``, ``local``
            or ``debug``. partition: The Slurm partition. gpus_per_job / cpus_per_job / mem_gb / timeout_min:
            Each job's resources; with ``gpus_per_job`` > 1 the run trains in that many processes inside the job
            (``accelerate launch``, see :func:`~.runs.execute`).
    """

    folder: Path
    workers: int | None = None
    cluster: str | None = None
    partition: str | None = None
    gpus_per_job: int = 1
    cpus_per_job: int = 8
    mem_gb: int | None = None
    timeout_min: int = 24 * 60

    def run(self, runs: list[RunSpec], on_done: OnDone, worker: Worker = execute) -> list[dict[str, Any]]:
        import submitit

        executor = submitit.AutoExecutor(folder=str(self.folder), cluster=self.cluster)
        params: dict[str, Any] = {
            "timeout_min": self.timeout_min,
            "gpus_per_node": self.gpus_per_job,
            "cpus_per_task": self.cpus_per_job,
            "name": "visionpeft-sweep",
        }
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.workers:
            params["slurm_array_parallelism"] = self.workers
        executor.update_parameters(**params)
        # a job with several GPUs trains its run on all of them: accelerate launch inside the job, one process each
        processes = max(1, self.gpus_per_job)
        jobs = executor.map_array(worker, [{**asdict(run), "processes": processes} for run in runs])
        records = []
        for job, run in zip(jobs, runs):
            try:
                record = job.result()
            except Exception as err:  # the job failed outside the run (preempted, timed out, node lost)
                record = _lost(run, err)
            on_done(run, record)
            records.append(record)
        return records


@dataclass
class RayExecutor:
    """Ray core tasks: ``address`` of a running cluster (``auto``) or None to start a local one (with ``workers``
    CPUs, so that at most that many runs go at once)."""

    workers: int | None = None
    address: str | None = None
    gpus_per_run: float = 0
    cpus_per_run: float = 1

    def run(self, runs: list[RunSpec], on_done: OnDone, worker: Worker = execute) -> list[dict[str, Any]]:
        import ray

        if not ray.is_initialized():
            env = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}} if os.environ.get("PYTHONPATH") else None
            cpus = self.workers * self.cpus_per_run if self.workers and self.address is None else None
            ray.init(address=self.address, num_cpus=cpus, runtime_env=env, include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_gpus=self.gpus_per_run, num_cpus=self.cpus_per_run, max_retries=0)(worker)
        pending = {remote.remote(asdict(run)): run for run in runs}
        records = []
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(ref)
            try:
                record = ray.get(ref)
            except Exception as err:  # the worker or its node died
                record = _lost(run, err)
            on_done(run, record)
            records.append(record)
        return records


EXECUTORS = ("local", "slurm", "ray")


def make_executor(name: str, workers: int | None, folder: Path, options: dict[str, Any]):
    """The executor ``name`` with its ``--slurm.*`` / ``--ray.*`` options (its extra checked first)."""
    require_extra(name)
    if name == "local":
        return LocalExecutor(workers)
    if name == "slurm":
        return SubmititExecutor(folder / "submitit", workers, **options)
    return RayExecutor(workers, **options)
