"""The ``pretrain_text_to_image`` task's entry point: the tiny pipeline of the config's ``model.family``, a
``StableDiffusionPipeline`` (:mod:`.pretrain_sd`) or a ``FluxPipeline`` (:mod:`.pretrain_flux`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..trainers.run import run_task


def run(config: DictConfig, run_dir: Path, **options: Any) -> dict[str, Any]:
    """Pretrains (see :func:`~visionpeft.trainers.run.run_task` for the options); returns ``{"outputs":
    [RUN/pipeline], "vae", ...}``."""
    if config.model.family == "flux":
        from .pretrain_flux import PretrainFluxTrainer

        return run_task(PretrainFluxTrainer(), config, run_dir, **options)
    from .pretrain_sd import PretrainTextToImageTrainer

    return run_task(PretrainTextToImageTrainer(), config, run_dir, **options)
