"""A saved pretraining run of the tiny CLIP, evaluated: zero-shot top-1 of the folder the run wrote (``RUN/model``,
loaded by open_clip alone) on a split of ``clip_mix``, held-in and held-out classes apart, single template and the
pretraining templates' ensemble."""

from __future__ import annotations

from omegaconf import DictConfig

from ..errors import CheckpointError, ConfigError
from ..trainers.saved_run import EvalRequest
from .clip_mix import TEMPLATES
from .pretrain_clip import WEIGHTS_FILE, load_folder, zero_shot_accuracy

#: ``RUN/<this>``: the open_clip folder a finished pretraining run writes
MODEL = "model"


def evaluate(config: DictConfig, request: EvalRequest) -> list[str]:
    """One line per template set: zero-shot top-1 (%) on ``--split`` (default test) by subset and held-in / out."""
    if request.checkpoint:
        raise ConfigError(f"a pretraining run is evaluated from its {MODEL}/ folder; --checkpoint does not apply")
    folder = request.run_dir / MODEL
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"{request.run_dir} holds no {MODEL}/{WEIGHTS_FILE} yet: it is written when the run finishes "
            f"(--resume {request.run_dir} continues it)"
        )
    clip = load_folder(folder)
    split = request.split or "test"
    lines = []
    for label, templates in (("single template", TEMPLATES[:1]), (f"{len(TEMPLATES)} templates", TEMPLATES)):
        scores = zero_shot_accuracy(clip, split, templates, seed=config.data.seed)
        lines.append(
            f"{request.run_dir} [{MODEL}] zero-shot top-1 on {split}, {label}: "
            + ", ".join(f"{name} {value:.1f}" for name, value in scores.items())
        )
    return lines
