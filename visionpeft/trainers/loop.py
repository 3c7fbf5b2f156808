"""The one training loop, on Hugging Face accelerate: devices, processes, mixed precision, accumulation.

Task-agnostic and counted in optimizer steps: an :class:`Objective` turns a batch into a loss and evaluates a model (it
holds whatever evaluation data it needs); the loop handles everything else: only trainable parameters in the
optimizer, a schedule from transformers' ``get_scheduler`` with warmup, evaluation every N steps exactly, a
progress bar, TensorBoard and ``metrics.jsonl``, atomic ``last`` / ``best`` adapter checkpoints, and exact resume
(optimizer, scheduler, RNG, EMA or a method's epoch average, trained tensors and the buffers of trained modules, at
epoch boundaries, with a seeded per-epoch data order).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from safetensors import SafetensorError
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..adapter import methods_of, trainable_buffers, trainable_parameters
from ..checkpoint.folder import save_adapter
from ..errors import CheckpointError, ConfigError
from . import run_state
from .epoch_average import epoch_average
from .logs import get_logger
from .trackers import RunTrackers, tracker_arguments

logger = get_logger(__name__)


@dataclass
class LoopConfig:
    """How long and how to train; built from a run config's ``optim`` and ``train`` sections by :meth:`from_config`.

    ``epochs`` / ``steps``: the run length (exactly one); ``warmup_epochs`` / ``warmup_steps`` likewise (at most one).
    ``eval_every`` counts in the run's unit (epochs or optimizer steps); None evaluates at the end only.
    ``ema_decay``: keep diffusers' ``EMAModel`` of the trained parameters (evaluation and the finished model use it).
    """

    epochs: int | None = None
    steps: int | None = None
    warmup_epochs: int | None = None
    warmup_steps: int | None = None
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    power: float = 1.0
    grad_accum: int = 1
    clip_grad: float | None = None
    mixed_precision: str = "no"
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None
    ema_decay: float | None = None
    report_to: str = "tensorboard"
    checkpoint_every: int | None = None
    checkpoints_total_limit: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> LoopConfig:
        optim, train = config.optim, config.train
        return cls(
            epochs=optim.epochs,
            steps=optim.steps,
            warmup_epochs=optim.warmup_epochs,
            warmup_steps=optim.warmup_steps,
            schedule=optim.schedule,
            min_lr_ratio=optim.min_lr / optim.lr if optim.lr else 0.0,
            power=optim.power,
            grad_accum=optim.grad_accum,
            clip_grad=optim.clip_grad,
            mixed_precision=train.mixed_precision,
            seed=train.seed,
            log_every=train.log_every,
            eval_every=train.eval_every,
            ema_decay=train.ema_decay,
            report_to=train.get("report_to", "tensorboard"),
            checkpoint_every=train.get("checkpoint_every"),
            checkpoints_total_limit=train.get("checkpoints_total_limit"),
        )

    def in_steps(self, count: int | None, steps_per_epoch: int) -> int | None:
        """``count`` in the run's unit (epochs for an epoch run) as optimizer steps."""
        return None if count is None else count * (steps_per_epoch if self.steps is None else 1)


class Objective(Protocol):
    """What the loop needs from a task."""

    metric: str  # key of the metric that selects the best checkpoint (higher is better)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, accelerator: Accelerator) -> dict[str, float]: ...

    # optional: ``last_images`` ({panel name: [PIL images]}) made by the latest evaluate, logged to the trackers


def build_scheduler(
    cfg: LoopConfig, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, processes: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule from transformers' ``get_scheduler``, in scheduler units: accelerate steps a
    prepared scheduler once per process per optimizer step, so the lengths are multiplied by the process count.

    A parameter group holding ``train_until`` (a share of the run, ``optim.train_fraction``) follows the schedule for
    the first ``int(train_until * total_steps)`` optimizer steps and has learning rate 0 after them: its tensors no
    longer change (AdamW's decoupled decay is scaled by the lr too). diffusers' pivotal tuning stops the text
    encoder's groups the same way, counted in epochs (``train_dreambooth_lora_sdxl_advanced.py`` lines 2084-2115:
    ``optimizer.param_groups[1]["lr"] = 0.0`` before every step once ``epoch == int(frac * num_train_epochs)``)."""
    from transformers import get_scheduler

    name, kwargs = cfg.schedule, {}
    if name == "cosine":
        name, kwargs = "cosine_with_min_lr", {"min_lr_rate": cfg.min_lr_ratio}
    elif name == "polynomial":
        kwargs = {"power": cfg.power, "lr_end": cfg.min_lr_ratio * optimizer.defaults["lr"]}
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps * processes,
        num_training_steps=total_steps * processes,
        scheduler_specific_kwargs=kwargs,
    )
    stopping = [index for index, group in enumerate(optimizer.param_groups) if "train_until" in group]
    for index in stopping:
        stop = int(optimizer.param_groups[index]["train_until"] * total_steps) * processes
        scheduler.lr_lambdas[index] = functools.partial(stopped_after, scheduler.lr_lambdas[index], stop)
        optimizer.param_groups[index]["lr"] = scheduler.base_lrs[index] * scheduler.lr_lambdas[index](0)
    if stopping:  # what get_last_lr reports before the first step
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler


def stopped_after(schedule: Callable[[int], float], stop: int, step: int) -> float:
    """``schedule``'s factor before scheduler step ``stop``, 0 from it on."""
    return schedule(step) if step < stop else 0.0


def launched(cpu: bool = False) -> tuple[bool, bool]:
    """``(launched, cpu)``: whether this process is one of several that a launcher started (``WORLD_SIZE`` > 1), and
    the ``cpu`` flag its accelerate state needs: launched processes on a machine without an accelerator join one
    gloo group only when accelerate is told they run on the CPU; otherwise each would train alone as the main one."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return several, cpu or (several and not torch.accelerator.is_available())


def running_precision(requested: str, cpu: bool) -> str:
    """The mixed precision a run really trains in: the one asked for, except fp16 on the CPU (``--cpu``, or a machine
    without an accelerator), which falls back to fp32 (``no``) with one warning naming it. accelerate would keep the
    fp16 label there but run without autocast, so frozen weights stored in half precision would meet fp32
    activations (a dtype error) and a run with nothing frozen would train in fp32 under the fp16 name. bf16 runs on
    the CPU too (torch's CPU autocast), so it is kept."""
    if requested == "fp16" and (cpu or not torch.accelerator.is_available()):
        logger.warning("train.mixed_precision=fp16 needs a GPU; this run is on the CPU, so it trains in fp32 instead")
        return "no"
    return requested


def make_accelerator(cfg: LoopConfig, cpu: bool = False, run_dir: Path | None = None) -> Accelerator:
    """An accelerator for one run (with ``cfg.report_to``'s tracker when ``run_dir`` is given) in the precision that
    really runs (:func:`running_precision`: ``accelerator.mixed_precision``); several runs with different
    precisions may share a process (sweeps, notebooks)."""
    from accelerate.state import AcceleratorState

    cpu = launched(cpu)[1]
    precision = running_precision(cfg.mixed_precision, cpu)
    shared = AcceleratorState._shared_state
    if shared and (shared.get("_mixed_precision"), shared.get("_cpu")) != (precision, cpu):
        # accelerate keeps one process-wide state and refuses a second precision; the distributed set-up (the
        # PartialState) is kept, only the per-run settings are dropped.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        cpu=cpu,
        **tracker_arguments(cfg.report_to, run_dir),
    )


def _only_trained_tensors(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
    """accelerate save-state hook: the resumable state keeps the trained tensors and the buffers of trained modules
    (a decode head's BatchNorm statistics), not the frozen backbone (which the run rebuilds from its pretrained
    source); an SD U-Net is 3.4 GB, its LoRA a few MB."""
    for i, model in enumerate(models):
        weights[i] = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        weights[i].update({name: b.detach() for name, b in trainable_buffers(model)})


class Loop:
    """Trains ``model`` on ``task`` and keeps the run folder up to date.

    Args:
        model: The module trained (the adapted model, or a wrapper whose forward computes the loss).
        objective: Turns a batch into a loss and evaluates (an :class:`Objective`).
        optimizer: Built over the trainable parameters.
        train_loader: Training data (the loop prepares it).
        run_dir: The run folder.
        cfg: Loop settings.
        accelerator: Shared with the caller (who may have used it already).
        select_best: Keep a ``best`` adapter by the eval metric (only when evaluating on a validation split:
            choosing a checkpoint on the test split would overstate its accuracy).
        adapted: The module carrying the visionpeft methods, when ``model`` wraps it (default: ``model``).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        train_loader: DataLoader,
        run_dir: Path,
        cfg: LoopConfig,
        accelerator: Accelerator,
        select_best: bool = True,
        adapted: nn.Module | None = None,
    ) -> None:
        self.objective, self.cfg, self.run_dir, self.accelerator = objective, cfg, Path(run_dir), accelerator
        self.select_best = select_best
        self._adapted = adapted
        self.model, self.optimizer, self.train_loader = accelerator.prepare(model, optimizer, train_loader)
        self.steps_per_epoch = max(1, math.ceil(len(self.train_loader) / cfg.grad_accum))
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.steps_per_epoch
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else (cfg.warmup_epochs or 0) * self.steps_per_epoch
        self.warmup_steps = min(warmup, self.total_steps)
        self.eval_every = cfg.in_steps(cfg.eval_every, self.steps_per_epoch)
        scheduler = build_scheduler(
            cfg, self.optimizer.optimizer, self.total_steps, self.warmup_steps, accelerator.num_processes
        )
        self.scheduler = accelerator.prepare(scheduler)
        self.epoch, self.step, self.best = 0, 0, -math.inf
        self.batch_in_epoch, self.epoch_loss = 0, [0.0, 0]  # progress inside the current epoch (sum, batches)
        self.trackers = RunTrackers(accelerator, self.run_dir, cfg.report_to)
        self._trained = [p for _, p in trainable_parameters(self.unwrapped)]
        accelerator.register_save_state_pre_hook(_only_trained_tensors)
        self.ema = None
        if cfg.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            # saved by save_state as safetensors (accelerate's register_for_checkpointing would unpickle it on resume)
            self.ema = EMAModel(self._trained, decay=cfg.ema_decay)
        # a method's average over epochs (PromptSRC's GPA), as many epochs as the run starts
        self.average = epoch_average(self.unwrapped, self._trained, math.ceil(self.total_steps / self.steps_per_epoch))
        # what attached methods do after each optimizer step (textual inversion's retract_embeddings)
        self._step_hooks = [
            m.after_optimizer_step for m in methods_of(self.unwrapped) if "after_optimizer_step" in m.provides
        ]
        if self.average is not None and self.ema is not None:
            raise ConfigError(
                f"train.ema_decay and {self.average.source}'s average over epochs would both set the final weights; "
                "set train.ema_decay=null"
            )

    # -- bookkeeping --------------------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> nn.Module:
        """The model carrying the methods, without accelerate's wrappers."""
        return self._adapted if self._adapted is not None else self.accelerator.unwrap_model(self.model)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def log(self, record: dict[str, Any]) -> None:
        """Appends ``record`` (with the current epoch and step) to ``metrics.jsonl`` and the trackers."""
        if not self.accelerator.is_main_process:
            return
        epoch = self.epoch + (1 if self.batch_in_epoch else 0)  # the epoch the step belongs to (1-based)
        record = {"epoch": epoch, "step": self.step, **record}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k not in ("epoch", "step") and isinstance(v, (int, float))}
        self.trackers.log(scalars, self.step)

    def save_state(self) -> None:
        """Writes the resumable state and the ``last`` adapter; the previous state stays until the new one is
        complete (see :mod:`.run_state`). A failed save (a full disk) keeps the previous state and says so."""
        accelerator, main = self.accelerator, self.accelerator.is_main_process
        accelerator.wait_for_everyone()
        tmp = self.run_dir / run_state.TMP
        if main and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        progress = {
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_loss": self.epoch_loss,
            "rng": run_state.rng_digest(),
        }
        try:
            accelerator.save_state(str(tmp))
            # every process writes its own random state into tmp: none may be renamed away before all are written
            accelerator.wait_for_everyone()
            if main:
                if self.ema is not None:
                    progress["ema"] = run_state.save_ema(self.ema, tmp)
                if self.average is not None:
                    progress["average"] = self.average.save(tmp)
                save_adapter(self.unwrapped, self.run_dir / "last")
                run_state.write_progress(tmp, progress)  # last: it marks the state complete
                run_state.commit_state(self.run_dir)
        except (OSError, RuntimeError) as err:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.run_dir / run_state.STATE
            kept = (
                f"the state of step {run_state.read_progress(previous)['step']} is kept in {previous}"
                if run_state.is_complete(previous)
                else "no earlier state exists"
            )
            text = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip()
            reason = text.splitlines()[0] if text else type(err).__name__
            raise CheckpointError(f"could not save the run state at step {self.step} ({reason}); {kept}") from None
        accelerator.wait_for_everyone()

    def load_state(self) -> None:
        """Restores the newest complete state (finishing or rolling back an interrupted save first) and trims the
        records logged after it. Nothing in the folder is unpickled beyond what ``weights_only`` allows."""
        if self.accelerator.is_main_process:
            run_state.recover_state(self.run_dir)
        self.accelerator.wait_for_everyone()
        state = self.run_dir / run_state.STATE
        if not run_state.is_complete(state):
            raise CheckpointError(f"{self.run_dir} holds no complete saved state to resume from")
        progress = run_state.read_progress(state)
        try:
            self.accelerator.load_state(str(state), strict=False)  # the state holds the trained tensors only
        except (pickle.UnpicklingError, SafetensorError, RuntimeError, ValueError, KeyError, OSError, EOFError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise CheckpointError(
                f"{state} cannot be resumed: a file in it is damaged or was not written by visionpeft "
                f"({type(err).__name__}{': ' + reason[:160] if reason else ''})"
            ) from None
        if self.ema is not None:
            run_state.load_ema(self.ema, state, progress.get("ema"))
        if self.average is not None:
            self.average.load(state, progress.get("average"))
        if progress.get("rng") != run_state.rng_digest():
            logger.warning(
                f"the random state saved in {state} could not be restored: the resumed run will not "
                "repeat an uninterrupted one exactly"
            )
        self.epoch, self.step, self.best = progress["epoch"], progress["step"], progress["best"]
        self.batch_in_epoch, self.epoch_loss = progress["batch_in_epoch"], progress["epoch_loss"]
        self.trackers.purge_step = self.step + 1  # TensorBoard drops the events logged after the saved state
        if self.batch_in_epoch:
            logger.info(
                f"resuming inside epoch {self.epoch + 1} at step {self.step}: the data order is the "
                "uninterrupted run's; random augmentation of its remaining batches may differ"
            )
        if self.accelerator.is_main_process:
            run_state.trim_metrics(self.run_dir / "metrics.jsonl", self.step)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the block the model carries the EMA weights (if any); the trained ones come back after."""
        if self.ema is None:
            yield
            return
        self.ema.store(self._trained)
        self.ema.copy_to(self._trained)
        try:
            yield
        finally:
            self.ema.restore(self._trained)

    # -- training -----------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Runs the task's evaluation (with the EMA weights, if any); the model is back in train mode after."""
        self.model.eval()
        with torch.no_grad(), self.ema_weights():
            metrics = self.objective.evaluate(self.model, self.accelerator)
            if self.select_best and metrics and metrics[self.objective.metric] > self.best:
                self.best = metrics[self.objective.metric]
                if self.accelerator.is_main_process:
                    save_adapter(self.unwrapped, self.run_dir / "best")
        return metrics

    def _train_mode(self) -> None:
        from ..adapter import set_train_mode

        self.model.train()  # the DDP wrapper, if any
        set_train_mode(self.unwrapped, True)

    def _batches(self) -> Iterator[Any]:
        """The current epoch's batches, in its seeded order (after a resume from a step checkpoint, without the
        batches the epoch had already used)."""
        self.train_loader.set_epoch(self.epoch)
        if self.batch_in_epoch:
            return iter(self.accelerator.skip_first_batches(self.train_loader, self.batch_in_epoch))
        return iter(self.train_loader)

    def _optimizer_step(self, batch: Any) -> float:
        accelerator, cfg = self.accelerator, self.cfg
        with accelerator.accumulate(self.model):
            loss = self.objective.loss(self.model, batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.clip_grad:
                accelerator.clip_grad_norm_(self._trained, cfg.clip_grad)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:  # a real step (accelerate skips the others)
                for hook in self._step_hooks:
                    hook()
        return accelerator.gather(loss.detach().float().reshape(1)).mean().item()

    def _end_epoch(self) -> None:
        total, count = self.epoch_loss
        self.epoch += 1
        self.batch_in_epoch, self.epoch_loss = 0, [0.0, 0]
        self.log({"train/epoch_loss": total / max(1, count)})

    def fit(self, stop_after: int | None = None) -> dict[str, float]:
        """Trains until the run's last step (or for ``stop_after`` more epochs); returns the last evaluation.

        Evaluation runs every ``eval_every`` optimizer steps exactly and after the last step. The resumable state is
        saved at the end of every epoch and of the run (a resumed run then repeats an uninterrupted one exactly),
        and every ``checkpoint_every`` optimizer steps (step checkpoints: the resumed run skips the batches the
        epoch had used, in the same order; the data loader reads a batch ahead, so random augmentation of the
        rest of that epoch may differ from the uninterrupted run's).
        """
        last: dict[str, float] = {}
        stop_epoch = None if stop_after is None else self.epoch + stop_after
        with tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            dynamic_ncols=True,
            disable=not self.accelerator.is_local_main_process,
        ) as bar:
            self._train_mode()
            while not self.finished and (stop_epoch is None or self.epoch < stop_epoch):
                for batch in self._batches():
                    value = self._optimizer_step(batch)
                    self.batch_in_epoch += 1
                    self.epoch_loss = [self.epoch_loss[0] + value, self.epoch_loss[1] + 1]
                    if self.accelerator.sync_gradients:
                        last = self._after_optimizer_step(value, bar) or last
                        if self.finished:
                            break
        if self.ema is not None and self.finished:
            self.ema.copy_to(self._trained)  # a finished run leaves the average in the model
        self.trackers.flush()
        return last

    def _after_optimizer_step(self, value: float, bar: tqdm) -> dict[str, float] | None:
        """Bookkeeping of one optimizer step: EMA, logs, epoch end, evaluation when due, the resumable state."""
        self.step += 1
        bar.update(1)
        bar.set_postfix(epoch=self.epoch + 1, loss=f"{value:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        if self.ema is not None:
            self.ema.step(self._trained)
        if self.step % self.cfg.log_every == 0:
            self.log({"train/loss": value, "lr": self.scheduler.get_last_lr()[0]})
        epoch_done = self.batch_in_epoch == len(self.train_loader)
        if epoch_done:
            self._end_epoch()
        if self.average is not None and (epoch_done or self.finished):
            self.average.add(self.epoch if epoch_done else self.epoch + 1)  # a step-counted run's last part-epoch
            if self.finished:
                self.average.copy_to()  # the finished run's weights: evaluated, saved as last, tested
        metrics = None
        if self.finished or bool(self.eval_every and self.step % self.eval_every == 0):
            metrics = self._evaluate_and_log()
        step_checkpoint = bool(self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0)
        if epoch_done or self.finished or step_checkpoint:
            self.save_state()
        if step_checkpoint and self.accelerator.is_main_process:
            run_state.keep_step_checkpoint(self.run_dir, self.step, self.cfg.checkpoints_total_limit)
        return metrics

    def _evaluate_and_log(self) -> dict[str, float]:
        metrics = self.evaluate()
        self._train_mode()
        if self.accelerator.is_main_process:
            for name, images in (getattr(self.objective, "last_images", None) or {}).items():
                self.trackers.log_images(name, images, self.step)
        if metrics:
            self.log({f"eval/{k}": v for k, v in metrics.items()})
            summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            logger.info(f"step {self.step}/{self.total_steps} (epoch {self.epoch}): {summary}")
        return metrics
