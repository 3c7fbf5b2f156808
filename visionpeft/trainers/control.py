"""Conditional control of a Stable Diffusion pipeline: ControlNet, ControlNet-LoRA, T2I-Adapter - one trainer.

Loads any SD 1.x / 2.x, SDXL, Flux or SD3 pipeline (``model.family`` checked against its folder before anything
loads; SDXL's U-Net and ControlNet get the added conditions of :mod:`.sdxl_conditioning`, the pairs uncropped at
``data.size`` as ``train_controlnet_sdxl.py`` computes them; a Flux / SD3 ControlNet reads the VAE's latents of the
condition and the step is the flow-matching loss of :mod:`.flow_matching`), attaches the control method(s) (with
other methods if asked: a DreamBooth-LoRA on the U-Net trains jointly), and trains on (image, condition, caption)
triples with the denoising loss; each batch's condition images reach the methods through ``vp.conditioning`` (one
image for every control, or with ``data.conditioning_columns`` a column of its own per control:
:mod:`.control_inputs`).
Validation samples training pairs with the pipeline (image grids in the run folder) and, for fill50k data, logs the
fill IoU. The run folder receives ``adapter/`` (visionpeft) and what diffusers loads as it is: ``controlnet/``
(``ControlNetModel.from_pretrained``, Flux / SD3: ``FluxControlNetModel`` / ``SD3ControlNetModel``; for
ControlNet-LoRA the copy with its LoRA merged), ``t2i_adapter/`` (``T2IAdapter.from_pretrained``) or the other
methods' diffusers files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from ..adapter import attach, can_export, conditioning, methods_of
from ..backbones import pipeline_modules
from ..backbones.diffusers_loading import PATCHED_FAMILIES, family_of_class, load_pipeline, replace_vae
from ..checkpoint.folder import load_adapter, save_adapter
from ..config import method_configs
from ..config.diffusion_objective import DiffusionObjective, objective_of
from ..data.control_pairs import ControlPairs
from ..data.fill50k import fill_iou
from .control_inputs import condition_columns, draw_conditions, per_control
from .diffusion import DiffusionParts, denoiser_of, diffusion_loss, frozen_modules, prompt_encoder
from .diffusion_objective import check_objective, use_trained_sampling
from .personalization import check_family, check_size, expected_family, stores_lowered, takes
from .run import Setup, run_task


class ControlDenoiser(nn.Module):
    """The adapted pipeline modules plus the frozen VAE, with the denoising loss under the batch's conditions."""

    def __init__(
        self,
        adapted: nn.Module,
        pipeline,
        timestep_sampling: str = "uniform",
        objective: DiffusionObjective | None = None,
    ) -> None:
        super().__init__()
        self.adapted, self.vae, self.timestep_sampling = adapted, pipeline.vae, timestep_sampling
        self.objective = objective
        self.__dict__["parts"] = DiffusionParts.from_pipeline(pipeline, cache_prompts=True, objective=objective)

    def forward(self, batch: dict) -> torch.Tensor:
        with conditioning(self.adapted, control_image=per_control(self.adapted, batch["conditioning_pixel_values"])):
            return diffusion_loss(
                self.parts,
                batch["pixel_values"],
                list(batch["prompt"]),
                objective=self.objective,
                timestep_sampling=self.timestep_sampling,
            )


class ControlValidation:
    """Samples the first ``train.validation_pairs`` training pairs; their grid (condition(s) | sample | target per
    row) goes to ``validation/NNN.png``; fill50k pairs also give the mean fill IoU. Samples are drawn as the run
    trains (its prediction type, zero terminal SNR) with ``train.guidance_rescale``."""

    metric = "fill_iou"

    def __init__(self, pipeline, cfg: DictConfig, run_dir: Path, pairs: ControlPairs) -> None:
        self.pipeline, self.cfg, self.run_dir, self.pairs = pipeline, cfg, run_dir, pairs
        use_trained_sampling(pipeline, objective_of(cfg.optim))
        self.calls = 0

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch)

    def evaluate(self, model: nn.Module, accelerator) -> dict[str, float]:
        self.calls += 1
        # the methods' numbers from the last training step, before sampling changes them
        diagnostics = {key: value for m in methods_of(self.pipeline) for key, value in m.diagnostics().items()}
        count = min(self.cfg.train.validation_pairs, len(self.pairs))
        if not accelerator.is_main_process or count == 0:
            return diagnostics
        from diffusers.utils import make_image_grid

        rows, scores = self.draw(accelerator, count)
        grid = make_image_grid([image for row in rows for image in row], rows=count, cols=len(rows[0]))
        folder = self.run_dir / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"{self.calls:03d}.png")
        self.last_images = {"validation/condition | sample | target": [grid]}
        return {**diagnostics, **({"fill_iou": float(np.mean(scores))} if scores else {})}

    def draw(self, accelerator, count: int) -> tuple[list[list], list[float]]:
        """Samples the first ``count`` pairs: ([condition(s), sample, target] per pair; the fill IoU of each fill50k
        pair)."""
        rows, scores = [], []
        for index in range(count):
            item, record = self.pairs[index], self.pairs.records[index]
            conditions = item["conditioning_pixel_values"]
            image = self.sample(accelerator, conditions, record["text"], self.cfg.train.seed)
            shown = conditions if isinstance(conditions, list) else [conditions]
            rows.append([*map(_to_pil, shown), image, _to_pil(item["pixel_values"] * 0.5 + 0.5)])
            if "circle" in record:
                scores.append(fill_iou(image, record))
        return rows, scores

    def sample(self, accelerator, condition: torch.Tensor | list[torch.Tensor], prompt: str, seed: int):
        """One image of ``prompt`` under ``condition`` ((3, S, S) in [0, 1]; a list: one per control), drawn with
        ``seed``."""
        size = self.cfg.data.size
        self.pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        rescale = self.cfg.train.guidance_rescale
        options = {"guidance_rescale": rescale} if takes(self.pipeline, "guidance_rescale") else {}  # Flux / SD3: none
        batched = [c[None] for c in condition] if isinstance(condition, list) else condition[None]
        with accelerator.autocast(), conditioning(self.pipeline, control_image=per_control(self.pipeline, batched)):
            draw_conditions(self.pipeline, generator, 1)  # a Flux ControlNet's, as FluxControlNetPipeline draws it
            return self.pipeline(
                prompt,
                num_inference_steps=self.cfg.train.validation_steps,
                guidance_scale=self.cfg.train.guidance_scale,
                generator=generator,
                **options,
                height=size,
                width=size,
            ).images[0]


def start_control_from(pipeline, folder: Path) -> None:
    """Loads a diffusers ControlNet / T2I-Adapter folder's weights into the run's one control of that method
    (``model.init_control``: fine-tuning a trained control, as ``train_controlnet.py``'s
    ``--controlnet_model_name_or_path``).

    Raises:
        ConfigError: No attached method reads that folder's class, or several do (which one would start from it).
        CheckpointError: The folder does not load, or was built for a denoiser of other shapes.
    """
    from ..errors import ConfigError
    from ..methods.folders import read_diffusers_folder

    read = read_diffusers_folder(folder)
    attached = methods_of(pipeline)
    matching = [method for method in attached if method.name == read.method]
    if len(matching) != 1:
        trained = ", ".join(method.key for method in attached)
        raise ConfigError(
            f"model.init_control is a {read.class_name}, which starts one {read.method}; this run trains {trained}"
        )
    matching[0].load_folder_model(read.model)


def _to_pil(tensor: torch.Tensor):
    from PIL import Image

    return Image.fromarray((tensor.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))


class ControlTrainer:
    def build(self, config: DictConfig, accelerator, run_dir: Path) -> Setup:
        from ..errors import ConfigError

        if not config.data.root:
            raise ConfigError("data.root is required: the folder with metadata.jsonl (or fill50k's prompt.json)")
        data = config.data
        expected_family(config)  # model.family and data.size against the folder's files, before anything loads
        columns = condition_columns(config)
        pairs = ControlPairs(data.root, data.size, data.proportion_empty_prompts, data.conditioning, columns=columns)
        shown = pairs.for_validation()
        pipeline = load_pipeline(config.model.name)
        loaded = family_of_class(type(pipeline).__name__)
        check_family(config.model, loaded, type(pipeline).__name__)
        if config.model.vae is not None:
            replace_vae(pipeline, config.model.vae, "model.vae")
        patched = loaded in PATCHED_FAMILIES  # Flux / SD3: 2 x 2 latent patches
        vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        check_size(data.size, vae_scale * (2 if patched else 1), config.model.name, patched)
        knobs = objective_of(config.optim)
        prompt_encoder(pipeline, knobs).check_pipeline(config.model.name)  # Flux / SD3: T5, guidance
        check_objective(knobs, pipeline.scheduler, config.model.name)
        attach(pipeline, method_configs(config))
        if config.model.init_control:
            start_control_from(pipeline, Path(config.model.init_control))
        adapted = pipeline_modules(pipeline)
        denoiser_net = denoiser_of(pipeline)  # a U-Net, or a Flux / SD3 transformer
        if config.train.gradient_checkpointing:
            denoiser_net.enable_gradient_checkpointing()
        objective = ControlValidation(pipeline, config, run_dir, shown)
        denoiser = ControlDenoiser(adapted, pipeline, config.train.timesteps, knobs)
        return Setup(
            denoiser,
            adapted,
            objective,
            pairs,
            frozen=frozen_modules(pipeline, adapted.text_encoders(), denoiser.parts),
            loader={"num_workers": data.num_workers},
            summary=[f"{len(pairs)} (image, condition, caption) triples from {data.root}"],
            state={"pipeline": pipeline},
        )

    def finish(self, config: DictConfig, loop, setup: Setup, run_dir: Path) -> dict[str, Any]:
        if not loop.accelerator.is_main_process:
            return {"outputs": []}
        pipeline = setup.state["pipeline"]
        outputs = [save_adapter(setup.adapted, run_dir / "adapter")]
        if can_export(pipeline, "diffusers"):  # controlnet/ (controlnet_1/ ...; the other methods' diffusers files)
            if stores_lowered(config, loop.accelerator) and any(m.exports_base_weights for m in methods_of(pipeline)):
                # unet/ of sd_locked=false: the frozen encoder from full-precision weights, not the rounded copy
                pipeline = load_adapter(load_pipeline(config.model.name), run_dir / "adapter")
            outputs.append(save_adapter(pipeline, run_dir, format="diffusers"))
        return {"outputs": outputs}


def run(config: DictConfig, run_dir: Path, **options: Any) -> dict[str, Any]:
    """Trains (see :func:`~.run.run_task` for the options); returns ``{"outputs": [paths], "steps": n, ...}``."""
    return run_task(ControlTrainer(), config, run_dir, **options)
