"""The run skeleton every task shares: seed, accelerator, build, summary, run folder, loader, optimizer, loop.

A task supplies a :class:`Trainer`: ``build`` makes the model, its methods, the training set and the evaluation
(a :class:`~.loop.Objective`); ``finish`` does what follows a completed run (test evaluation, exported files). The
skeleton does the rest the same way for every task: ``data.batch_size`` is the batch per optimizer step whatever
the number of processes and the accumulation, the optimizer holds the trainable parameters only, frozen weights
go to half precision under the mixed precision that really runs (fp16 asked for on a CPU runs in fp32, with a
warning: :func:`~.loop.running_precision`), and the run folder never overwrites another run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..adapter import count_parameters, require_state, trainable_parameters
from ..checkpoint.base_weights import frozen_weights_sha256
from ..config import save_config
from ..data.images import WorkerSafe
from ..errors import ConfigError
from . import run_state
from .base_storage import store_frozen_base
from .logs import get_logger
from .loop import Loop, LoopConfig, Objective, make_accelerator
from .run_card import write_run_card
from .trackers import check_report_to

logger = get_logger(__name__)


@dataclass
class Setup:
    """What a task builds for one run.

    Attributes:
        model: The module the loop trains (the adapted model, or a wrapper whose forward is the loss).
        adapted: The module carrying the methods (what checkpoints save).
        objective: Loss and evaluation (an :class:`~.loop.Objective`).
        train_set: The training data.
        select_best: Keep a ``best`` adapter by the task's metric (a validation split exists).
        frozen: Modules whose frozen weights are stored in half precision under mixed precision.
        loader: Extra DataLoader options (``num_workers``, ``drop_last``, ``collate_fn``).
        summary: Lines describing the data, logged before training.
        state: Anything the task's ``finish`` needs.
        lr_multipliers: Parameter-name prefix -> learning-rate multiplier (see :func:`build_optimizer`).
        weight_decays: Parameter-name prefix -> weight decay instead of ``optim.weight_decay`` (the same).
        batch_sampler: Makes the loader's batch sampler from the per-process micro-batch, instead of shuffled
            batches of that size (aspect-ratio buckets: one image shape per batch); it reorders per ``set_epoch``.
    """

    model: nn.Module
    adapted: nn.Module
    objective: Objective
    train_set: Dataset
    select_best: bool = False
    frozen: list[nn.Module] = field(default_factory=list)
    loader: dict[str, Any] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    weight_decays: dict[str, float] = field(default_factory=dict)
    batch_sampler: Callable[[int], Sampler[list[int]]] | None = None


class Trainer(Protocol):
    def build(self, config: DictConfig, accelerator: Accelerator, run_dir: Path) -> Setup: ...

    def finish(self, config: DictConfig, loop: Loop, setup: Setup, run_dir: Path) -> dict[str, Any]: ...


def parameter_summary(model: nn.Module) -> list[str]:
    counts = count_parameters(model)
    lines = [
        f"total parameters:     {counts['total']:>14,}",
        f"trainable parameters: {counts['trainable']:>14,} "
        f"({100 * counts['trainable'] / max(1, counts['total']):.3f}%)",
    ]
    return lines + [f"  {group:<20}{n:>14,}" for group, n in counts["by_group"].items()]


def micro_batch(batch_size: int, processes: int, grad_accum: int) -> int:
    """The per-process micro-batch of a ``batch_size`` per optimizer step."""
    shards = processes * grad_accum
    if batch_size % shards:
        raise ConfigError(
            f"data.batch_size {batch_size} is not divisible by {processes} process(es) x optim.grad_accum {grad_accum}"
        )
    return batch_size // shards


def build_optimizer(
    optim: DictConfig,
    model: nn.Module,
    batch_size: int,
    lr_multipliers: dict[str, float] | None = None,
    weight_decays: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    """SGD (momentum), AdamW, Prodigy or 8-bit AdamW over the trainable parameters only; biases and norms (1-D
    tensors) without weight decay unless ``optim.bias_decay``; lr scaled by ``batch_size / optim.lr_scale_batch``
    when that is set; with ``optim.loraplus_lr_ratio`` (LoRA+) the tensors :func:`loraplus_fast` picks learn that
    many times faster.

    Args:
        lr_multipliers: Parameter-name prefix -> learning-rate multiplier (the first matching prefix counts); such
            parameters get their own groups (a decode head trained 10x faster than the backbone). LoRA+'s ratio
            multiplies it.
        weight_decays: Parameter-name prefix -> weight decay instead of ``optim.weight_decay`` (the first matching
            prefix counts; 1-D tensors exempt from decay stay exempt): such parameters get their own groups (the
            text encoders' in diffusers' SDXL / Flux / SD3 DreamBooth-LoRA scripts).
    """
    lr = optim.lr * (batch_size / optim.lr_scale_batch if optim.lr_scale_batch else 1.0)
    multipliers = lr_multipliers or {}
    ratio = optim.get("loraplus_lr_ratio")
    fractions = method_fractions(optim.get("train_fraction") or {}, model)
    grouped: dict[tuple[float, bool, float, float], list[nn.Parameter]] = {}
    for name, param in trainable_parameters(model):
        exempt = not optim.bias_decay and (param.ndim <= 1 or name.endswith(".bias"))
        scale = next((m for prefix, m in multipliers.items() if name.startswith(prefix)), 1.0)
        if ratio is not None and loraplus_fast(name, param):
            scale *= ratio
        decay = next((d for prefix, d in (weight_decays or {}).items() if name.startswith(prefix)), optim.weight_decay)
        grouped.setdefault((scale, exempt, fractions.get(id(param), 1.0), decay), []).append(param)
    groups = [
        {"params": grouped[key], "weight_decay": 0.0 if key[1] else key[3], "lr": lr * key[0]}
        | ({"train_until": key[2]} if key[2] < 1.0 else {})
        for key in sorted(grouped, key=lambda k: (k[2] != 1.0, k[0] != 1.0, k[0], k[1], k[2], k[3]))
    ]  # decay, no decay; then multiplied ones; then the ones that stop early
    if not groups:
        raise ConfigError("the method leaves nothing to train")
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum)
    if optim.name == "prodigy":
        return prodigy(groups, lr)
    if optim.name == "adamw8bit":  # diffusers' --use_8bit_adam: bitsandbytes' AdamW8bit, betas / eps as AdamW's
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def method_fractions(shares: dict[str, float], model: nn.Module) -> dict[int, float]:
    """``optim.train_fraction`` per tensor: id of each trained tensor of a named method -> the share of the run it
    trains (:func:`~.loop.build_scheduler` sets its groups' learning rate to 0 after it).

    Raises:
        ConfigError: A name that is no attached method, in one line with the attached ones.
    """
    if not shares:
        return {}
    methods = require_state(model).methods
    attached = [method.name for method in methods]
    for name in shares:
        if name not in attached:
            raise ConfigError(
                f"optim.train_fraction names {name}, which this run does not attach (attached: {', '.join(attached)})"
            )
    return {id(p): float(shares[m.name]) for m in methods if m.name in shares for p in m.parameters()}


def loraplus_fast(name: str, param: nn.Parameter) -> bool:
    """The tensors LoRA+ (arXiv 2402.12354) trains at ``lr x loraplus_lr_ratio``: LoRA's B matrices and every 1-D
    tensor (biases, DoRA magnitudes), PEFT's rule (``peft/optimizers/loraplus.py``, ``create_loraplus_optimizer``:
    ``"lora_B" in name or param.ndim == 1``)."""
    return "lora_B" in name or param.ndim == 1


def prodigy(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio, ICML 2024) with diffusers' example settings
    (``train_dreambooth_lora_sdxl_advanced.py`` lines 1822-1854, ``--optimizer prodigy``: decoupled weight decay,
    bias correction, safeguard warmup; betas (0.9, 0.999)); each group's lr multiplies the step size Prodigy
    estimates."""
    from prodigyopt import Prodigy

    if lr <= 0.1:
        logger.warning(f"optim.lr={lr} with prodigy: lr multiplies the estimated step size; 1.0 is the usual value")
    return Prodigy(groups, lr=lr, decouple=True, use_bias_correction=True, safeguard_warmup=True)


def freeze_in_precision(modules: list[nn.Module], mixed_precision: str) -> None:
    """Under fp16 / bf16 mixed precision, stores the frozen weights in half precision and keeps the trained ones
    in fp32 (the optimizer then never sees half-precision parameters: no "unscale FP16 gradients" errors).

    diffusers' scripts cast the whole model to half precision and then the trained parameters back with
    ``cast_training_params``; casting only the frozen ones gives the same result without sending the trained
    weights' initial values (a LoRA's A, DiffFit's scales) through half precision and back."""
    if mixed_precision == "no":
        return
    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)


def run_task(
    trainer: Trainer,
    config: DictConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    dry_run: bool = False,
    stop_after: int | None = None,
    cpu: bool = False,
) -> dict[str, Any]:
    """Builds, trains and finishes one run of ``trainer``; returns the task's results plus ``parameters``."""
    loop_cfg = LoopConfig.from_config(config)
    check_report_to(loop_cfg.report_to)
    accelerator = make_accelerator(loop_cfg, cpu=cpu, run_dir=None if dry_run else run_dir)
    batch = config.data.batch_size
    per_process = micro_batch(batch, accelerator.num_processes, config.optim.grad_accum)
    if not dry_run:
        run_state.check_writable(run_dir)
    set_seed(config.train.seed)
    setup = trainer.build(config, accelerator, run_dir)
    for line in [*parameter_summary(setup.adapted), *setup.summary]:
        logger.info(line)
    results: dict[str, Any] = {"parameters": count_parameters(setup.adapted)}
    if dry_run:
        return results
    run_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process and not resume:
        save_config(config, run_dir / "config.yaml")
    options = {"num_workers": 0, **setup.loader}
    options["persistent_workers"] = options["num_workers"] > 0
    generator = torch.Generator().manual_seed(config.train.seed)
    # an unreadable item stays one line even when a loader worker re-raises it
    if setup.batch_sampler is not None:
        loader = DataLoader(WorkerSafe(setup.train_set), batch_sampler=setup.batch_sampler(per_process), **options)
    else:
        loader = DataLoader(
            WorkerSafe(setup.train_set), batch_size=per_process, shuffle=True, generator=generator, **options
        )
    optimizer = build_optimizer(config.optim, setup.adapted, batch, setup.lr_multipliers, setup.weight_decays)
    frozen_weights_sha256(setup.adapted)  # recorded in checkpoints: hash the weights before a half-precision cast
    freeze_in_precision(setup.frozen, accelerator.mixed_precision)  # what runs: fp16 asked on a CPU runs fp32
    store_frozen_base(setup.frozen, config.train.get("base_storage", "none"), accelerator.mixed_precision)
    loop = Loop(
        setup.model,
        setup.objective,
        optimizer,
        loader,
        run_dir,
        loop_cfg,
        accelerator,
        select_best=setup.select_best,
        adapted=setup.adapted,
    )
    if resume:
        loop.load_state()
    results["eval"] = loop.fit(stop_after=stop_after)
    results["steps"] = loop.step
    score = getattr(setup.objective, "metric", "none")  # the task's score: what selects its best checkpoint
    if score in results["eval"]:
        results["score"] = {score: results["eval"][score]}
    if loop.finished:
        results.update(trainer.finish(config, loop, setup, run_dir))
    results["parameters"] = count_parameters(loop.unwrapped)
    if loop.finished and accelerator.is_main_process:
        results.setdefault("outputs", []).append(write_run_card(config, setup.adapted, results, setup.summary, run_dir))
    accelerator.end_training()
    return results
