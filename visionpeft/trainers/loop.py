"""The one training loop, on Hugging Face accelerate: devices, processes, mixed precision, accumulation.

Task-agnostic: a :class:`Task` turns a batch into a loss and evaluates a model; the loop handles everything else:
only trainable parameters in the optimizer, warmup + cosine schedule, progress bars, TensorBoard and
``metrics.jsonl``, atomic ``last`` / ``best`` adapter checkpoints, and exact resume (optimizer, scheduler and
RNG states at epoch boundaries, a seeded per-epoch data order).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import visionpeft as vp

from ..io import atomic_write


@dataclass
class LoopConfig:
    """Attributes mirror the ``optim`` and ``train`` config sections.

    ``ema_decay``: keep an exponential moving average of the trained parameters (diffusers' ``EMAModel``, with its
    ``(1 + step) / (10 + step)`` ramp capped at ``ema_decay``); evaluation and the weights a finished run leaves
    in the model are the average. None: no EMA.
    """

    epochs: int
    warmup_epochs: int = 0
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    clip_grad: float | None = None
    mixed_precision: str = "no"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 1
    ema_decay: float | None = None


class Task(Protocol):
    """What the loop needs from a task."""

    metric: str  # key of the metric that selects the best checkpoint (higher is better)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]: ...


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup from 0, then cosine decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_accelerator(cfg: LoopConfig, cpu: bool = False) -> Accelerator:
    """An accelerator for one run; several runs with different precisions may share a process (sweeps, notebooks)."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and (shared.get("_mixed_precision"), shared.get("_cpu")) != (cfg.mixed_precision, cpu):
        # accelerate keeps one process-wide state and refuses a second precision; the distributed set-up (the
        # PartialState) is kept, only the per-run settings are dropped.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        cpu=cpu,
    )


def _only_trained_weights(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
    """accelerate save-state hook: the resumable state keeps the trained tensors, not the frozen backbone (which
    the run rebuilds from its pretrained source); an SD U-Net is 3.4 GB, its LoRA a few MB."""
    for i, model in enumerate(models):
        weights[i] = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


class Loop:
    """Trains ``model`` on ``task`` and keeps the run folder up to date.

    Args:
        model: The adapted model (its trainable parameters are exactly what the optimizer receives).
        task: The task.
        optimizer: Built over ``vp.trainable_parameters(model)``.
        train_loader / eval_loader: Data (the eval loader may be None).
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
        task: Task,
        optimizer: torch.optim.Optimizer,
        train_loader: DataLoader,
        eval_loader: DataLoader | None,
        run_dir: Path,
        cfg: LoopConfig,
        accelerator: Accelerator,
        select_best: bool = True,
        adapted: nn.Module | None = None,
    ) -> None:
        self.task, self.cfg, self.run_dir, self.accelerator = task, cfg, Path(run_dir), accelerator
        self.select_best = select_best
        self._adapted = adapted
        # Scheduler units: accelerate steps a prepared scheduler once per process per optimizer step, so an epoch is
        # len(loader before sharding) / grad_accum units whatever the number of processes.
        steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
        self.total_steps = steps_per_epoch * cfg.epochs
        schedule = warmup_cosine(self.total_steps, steps_per_epoch * cfg.warmup_epochs, cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        prepared = accelerator.prepare(model, optimizer, train_loader, scheduler)
        self.model, self.optimizer, self.train_loader, self.scheduler = prepared
        self.eval_loader = accelerator.prepare(eval_loader) if eval_loader is not None else None
        self.epoch, self.step, self.best = 0, 0, -math.inf
        self._writer = None
        self._purge_step: int | None = None  # on resume: TensorBoard drops events logged after the saved state
        self._trained = [p for _, p in vp.trainable_parameters(self.unwrapped)]
        accelerator.register_save_state_pre_hook(_only_trained_weights)
        self.ema = None
        if cfg.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self._trained, decay=cfg.ema_decay)
            accelerator.register_for_checkpointing(self.ema)  # resumes with the average, not a fresh copy

    # -- bookkeeping --------------------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> nn.Module:
        """The model carrying the methods, without accelerate's wrappers."""
        return self._adapted if self._adapted is not None else self.accelerator.unwrap_model(self.model)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self._purge_step)
        for key, value in record.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, record.get("step", self.step))

    def save_state(self) -> None:
        """Writes the resumable state and the ``last`` adapter; replaces the previous ones only when complete."""
        self.accelerator.wait_for_everyone()
        tmp = self.run_dir / "state.tmp"
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        if self.accelerator.is_main_process:
            progress = {"epoch": self.epoch, "step": self.step, "best": self.best}
            (tmp / "progress.json").write_text(json.dumps(progress))
            vp.save_adapter(self.unwrapped, self.run_dir / "last")
            final, old = self.run_dir / "state", self.run_dir / "state.old"
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def load_state(self) -> None:
        """Restores the state of the last completed epoch and trims later records from ``metrics.jsonl``."""
        state = self.run_dir / "state"
        self.accelerator.load_state(str(state), strict=False)  # the state holds the trained tensors only
        progress = json.loads((state / "progress.json").read_text())
        self.epoch, self.step, self.best = progress["epoch"], progress["step"], progress["best"]
        self._purge_step = self.step + 1
        log = self.run_dir / "metrics.jsonl"
        if self.accelerator.is_main_process and log.exists():
            kept = [line for line in log.read_text().splitlines() if json.loads(line)["epoch"] <= self.epoch]
            atomic_write(log, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))

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
    def train_epoch(self) -> float:
        accelerator, cfg = self.accelerator, self.cfg
        self.model.train()  # the DDP wrapper, if any
        vp.set_train_mode(self.unwrapped, True)
        self.train_loader.set_epoch(self.epoch)
        total, count = 0.0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not accelerator.is_local_main_process)  # fmt: skip
        for batch in bar:
            with accelerator.accumulate(self.model):
                loss = self.task.loss(self.model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.clip_grad:
                    accelerator.clip_grad_norm_(self._trained, cfg.clip_grad)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            value = accelerator.gather(loss.detach().float().reshape(1)).mean().item()
            total, count = total + value, count + 1
            if accelerator.sync_gradients:
                self.step += 1
                if self.ema is not None:
                    self.ema.step(self._trained)
                if self.step % cfg.log_every == 0:
                    lr = self.scheduler.get_last_lr()[0]
                    self._log({"epoch": self.epoch + 1, "step": self.step, "train/loss": value, "lr": lr})
                bar.set_postfix(loss=f"{value:.4f}")
        return total / max(1, count)

    def evaluate(self, loader: DataLoader | None = None) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            return self.task.evaluate(self.model, loader or self.eval_loader, self.accelerator)

    def fit(self, stop_after: int | None = None) -> dict[str, float]:
        """Trains until ``cfg.epochs`` (or ``stop_after`` more epochs); returns the last evaluation."""
        last_metrics: dict[str, float] = {}
        done_now = 0
        while self.epoch < self.cfg.epochs and (stop_after is None or done_now < stop_after):
            train_loss = self.train_epoch()
            self.epoch += 1
            done_now += 1
            record: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "train/epoch_loss": train_loss}
            if self.eval_loader is not None and (
                self.epoch % self.cfg.eval_every == 0 or self.epoch == self.cfg.epochs
            ):
                with self.ema_weights():
                    last_metrics = self.evaluate()
                    record.update({f"eval/{k}": v for k, v in last_metrics.items()})
                    if self.select_best and last_metrics[self.task.metric] > self.best:
                        self.best = last_metrics[self.task.metric]
                        if self.accelerator.is_main_process:
                            vp.save_adapter(self.unwrapped, self.run_dir / "best")
            self._log(record)
            if self.accelerator.is_main_process:
                summary = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "step"))
                tqdm.write(f"epoch {self.epoch}/{self.cfg.epochs}: {summary}")
            self.save_state()
        if self.ema is not None and self.epoch == self.cfg.epochs:
            self.ema.copy_to(self._trained)  # a finished run leaves the average in the model
        if self._writer is not None:
            self._writer.flush()
        return last_metrics
