"""Scoring NOAH candidates on the sweep executors: each generation's new subnets are split into jobs (one per worker),
each job a folder ``jobs/g<generation>-<hash>/`` that :func:`score_job` fills with ``result.json`` (the validation
top-1 of each of its subnets on the supernet's weights), or ``error.txt`` / ``traceback.txt``.

A job's folder is named by a hash of what it scores, so a search started again (it replays its seeded generations)
finds the jobs that finished and runs only the others. :func:`load_supernet` is what a worker and the search driver
both use to rebuild the trained supernet from its run folder (config + saved adapter, the classification task's own
loader).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, VisionPEFTError
from ..io import atomic_write
from ..methods.noah import NOAH, Subnet
from .runs import ERROR, LOG, TRACEBACK, read_error, read_result


class ScoringFailed(VisionPEFTError):
    """A scoring job failed (its folder holds the error and the traceback); the search stops there."""


@dataclass(frozen=True)
class ScoreJob:
    """One worker's share of a generation: score ``candidates`` with the supernet of ``run_dir`` on ``split``.

    Attributes:
        run_dir: The supernet's run folder. adapter: Its adapter folder (``last``: the final weights). split: The
            dataset split scored. candidates: Subnets (``{vpt: [...], lora: [...], adapter: [...]}``).
        folder: The job's folder. cpu: Stay on the CPU. processes: Set by a multi-GPU Slurm job (scoring runs
            in one process).
    """

    run_dir: str
    adapter: str
    split: str
    candidates: tuple[dict[str, list[int]], ...]
    folder: str
    cpu: bool = False
    processes: int = 1

    @property
    def path(self) -> Path:
        return Path(self.folder)

    def name(self) -> str:
        return f"{self.path.name} ({len(self.candidates)} subnets)"


JOB_FIELDS = {f.name for f in fields(ScoreJob)}


def job_folder(root: Path, generation: int, job: dict[str, Any]) -> str:
    """``root/jobs/g<generation>-<hash of what the job scores>``."""
    digest = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:12]
    return str(root / "jobs" / f"g{generation:02d}-{digest}")


def load_supernet(run_dir: Path, adapter: str):
    """``(config, experiment, noah method)`` of a trained NOAH supernet run (the classification task's model and
    data rebuilt from the run's config, the saved adapter loaded).

    Raises:
        CheckpointError: Not a run folder, no such adapter folder, or not a NOAH supernet.
    """
    from ..adapter import methods_of
    from ..trainers.classification_eval import load_classifier
    from ..trainers.saved_run import adapter_dir, load_run

    config, _ = load_run(run_dir, "the noah search")
    if config.task != "classification":
        raise CheckpointError(f"{run_dir} is a {config.task} run; the noah search scores classification supernets")
    folder = adapter_dir(run_dir, adapter)
    exp = load_classifier(config, folder, check_base=True)
    method = next((m for m in methods_of(exp.model) if isinstance(m, NOAH)), None)
    if method is None or method.config.mode != "supernet":
        what = "a noah subnet" if method is not None else "no noah method"
        raise CheckpointError(f"{folder} holds {what}; the search needs a supernet (method: {{name: noah}})")
    return config, exp, method


def validation_set(config, exp, split: str):
    """The evaluation dataset of ``split`` (the run's own val split as the run built it, else built the same way)."""
    from ..data.images import WorkerSafe
    from ..trainers.classification import Transformed, dataset_split
    from ..trainers.classification_eval import eval_transform

    if split == config.data.val_split and exp.val is not None:
        return exp.val
    return WorkerSafe(Transformed(dataset_split(config, split), eval_transform(config, exp.model)))


def score_candidates(job: ScoreJob) -> list[float]:
    """The top-1 of each candidate of ``job`` on its split, the supernet's shared weights fixed to that subnet."""
    import torch

    from ..trainers.classification import ClassificationObjective, loader
    from ..trainers.loop import LoopConfig, make_accelerator

    config, exp, method = load_supernet(Path(job.run_dir), job.adapter)
    accelerator = make_accelerator(LoopConfig(mixed_precision=config.train.mixed_precision), cpu=job.cpu)
    model = accelerator.prepare(exp.model).eval()
    dataset = validation_set(config, exp, job.split)
    batches = list(loader(dataset, config.data.eval_batch_size, config.data.num_workers))  # decoded once
    device, objective = accelerator.device, ClassificationObjective(len(exp.classes), None)
    scores = []
    with torch.no_grad():
        for subnet in job.candidates:
            method.fix_subnet(subnet)
            on_device = ((x.to(device), y.to(device)) for x, y in batches)
            scores.append(objective.evaluate(model, accelerator, on_device)["top1"])
    return scores


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def score_job(fields_of_job: dict[str, Any], score: Callable[[ScoreJob], list[float]] = score_candidates) -> dict:
    """The worker entry (an executor's ``worker``): scores the job (``score``: :func:`score_candidates`) unless its
    ``result.json`` exists; returns its record. A failure is recorded in the job's folder and returned (``status:
    failed``), never raised."""
    job = ScoreJob(**{k: v for k, v in fields_of_job.items() if k in JOB_FIELDS})
    done = read_result(job.path)
    if done is not None:
        return {**done, "status": "done", "skipped": True}
    job.path.mkdir(parents=True, exist_ok=True)
    for name in (ERROR, TRACEBACK):
        (job.path / name).unlink(missing_ok=True)
    start = time.time()
    try:
        with open(job.path / LOG, "w", buffering=1) as log, contextlib.redirect_stdout(log):
            with contextlib.redirect_stderr(log):
                scores = score(job)
    except BaseException as err:  # the job's failure, whatever it is, is its result
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
        (job.path / TRACEBACK).write_text(traceback.format_exc())
        (job.path / ERROR).write_text(message + "\n")
        if isinstance(err, KeyboardInterrupt):
            raise
        return {"status": "failed", "error": message}
    record = {"top1": scores, "candidates": list(job.candidates), "seconds": round(time.time() - start, 2)}
    _write_json(job.path / "result.json", record)  # last: the marker of a finished job
    return {**record, "status": "done"}


@dataclass
class JobScorer:
    """Scores a generation's candidates through ``executor`` in ``jobs`` jobs (read back from their folders), each run
    by ``worker`` (:func:`score_job`; a module-level function or a partial of one, so that it pickles)."""

    executor: Any
    root: Path
    run_dir: Path
    adapter: str
    split: str
    jobs: int = 1
    cpu: bool = False
    out: Any = print
    worker: Callable[[dict[str, Any]], dict[str, Any]] = score_job

    def __call__(self, candidates: list[Subnet], generation: int) -> list[float]:
        plain = [{m: list(v) for m, v in subnet.items()} for subnet in candidates]
        size = -(-len(plain) // max(1, min(self.jobs, len(plain))))
        jobs = []
        for start in range(0, len(plain), size):
            what = {"run_dir": str(self.run_dir), "adapter": self.adapter, "split": self.split}
            chunk = tuple(plain[start : start + size])
            folder = job_folder(self.root, generation, {**what, "candidates": chunk})
            jobs.append(ScoreJob(**what, candidates=chunk, folder=folder, cpu=self.cpu))
        missing = [job for job in jobs if read_result(job.path) is None]
        self.out(f"generation {generation}: {len(plain)} subnets in {len(jobs)} jobs, {len(missing)} to run")
        if missing:
            self.executor.run(missing, self._done, worker=self.worker)
        scores: list[float] = []
        for job in jobs:
            result = read_result(job.path)
            if result is None:
                raise ScoringFailed(
                    f"scoring job {job.path} failed: {read_error(job.path) or 'no result'} (traceback in "
                    f"{job.path / TRACEBACK}); run the search again to go on"
                )
            if result.get("candidates") != [dict(c) for c in job.candidates]:
                raise ConfigError(f"{job.path / 'result.json'} scores other subnets than its job; delete the folder")
            scores += result["top1"]
        return scores

    def _done(self, job: ScoreJob, record: dict[str, Any]) -> None:
        if record.get("status") != "done":
            self.out(f"  {job.name()}: FAILED: {record.get('error')}")
