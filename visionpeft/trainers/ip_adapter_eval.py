"""A saved IP-Adapter run evaluated by the trainer's validation grid: the first training images as image prompts,
each with its caption and alone (:meth:`ImagePromptValidation.draw`)."""

from __future__ import annotations

from omegaconf import DictConfig

from ..backbones.diffusers_loading import load_image_encoder
from .ip_adapter import ImagePromptValidation, image_processor, training_images
from .saved_run import EvalRequest, adapted_pipeline, adapter_dir, eval_folder, readable_grid


def evaluate(config: DictConfig, request: EvalRequest) -> list[str]:
    """``grid.png`` (reference | with caption | image alone per row) of ``--samples`` training images (default
    ``train.validation_references``)."""
    adapter = adapter_dir(request.run_dir, request.checkpoint)
    pipeline, accelerator = adapted_pipeline(config.model, adapter, request.cpu, request.check_base)
    encoder = load_image_encoder(config.model.image_encoder, config.model.image_encoder_subfolder)
    encoder.to(accelerator.device)
    references = training_images(config, image_processor(pipeline, encoder))
    count = min(request.samples or max(1, config.train.validation_references), len(references))
    validation = ImagePromptValidation(pipeline, encoder, config, request.run_dir, references)
    out = eval_folder(request, adapter.name)
    readable_grid(validation.draw(accelerator, count)).save(out / "grid.png")
    return [f"{request.run_dir} [{adapter.name}] {count} training images as image prompts: {out / 'grid.png'}"]
