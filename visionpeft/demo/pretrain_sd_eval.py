"""A saved pretraining run of the tiny text-to-image pipeline, evaluated: the validation grid (a row of samples per
prompt family, :class:`~.pretrain_sd.SampleGrids`) drawn again from the pipeline the run wrote (``RUN/pipeline``)."""

from __future__ import annotations

from omegaconf import DictConfig

from ..backbones.diffusers_loading import load_pipeline
from ..errors import CheckpointError, ConfigError
from ..trainers.saved_run import EvalRequest, device_of, eval_folder, readable_grid
from .pretrain_sd import VALIDATION_PROMPTS, SampleGrids

#: ``RUN/<this>``: the pipeline a finished pretraining run writes
PIPELINE = "pipeline"


def evaluate(config: DictConfig, request: EvalRequest) -> list[str]:
    """Writes ``grid.png`` (``--samples`` images per validation prompt) into the eval folder."""
    if request.checkpoint:
        raise ConfigError(f"a pretraining run is evaluated from its {PIPELINE}/ folder; --checkpoint does not apply")
    folder = request.run_dir / PIPELINE
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(
            f"{request.run_dir} holds no {PIPELINE}/ yet: it is written when the run finishes "
            f"(--resume {request.run_dir} continues it)"
        )
    pipeline = load_pipeline(str(folder)).to(device_of(request.cpu))
    per_prompt = request.samples or config.train.validation_images
    grids = SampleGrids
    if config.model.get("family") == "flux":  # drawn as the Flux pipeline trains: 32 px, T5 length, true CFG
        from .pretrain_flux import FluxSampleGrids as grids
    images = grids(pipeline, config, request.run_dir).draw(per_prompt)
    out = eval_folder(request, PIPELINE)
    readable_grid([images[i : i + per_prompt] for i in range(0, len(images), per_prompt)]).save(out / "grid.png")
    return [
        f"{request.run_dir} [{PIPELINE}] {per_prompt} sample(s) of each of {len(VALIDATION_PROMPTS)} validation "
        f"prompts: {out / 'grid.png'} (rows: {'; '.join(VALIDATION_PROMPTS)})"
    ]
