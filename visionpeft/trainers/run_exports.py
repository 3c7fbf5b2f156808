"""The files in other tools' formats a finished run writes into its folder besides its adapter (``train.export``).

``kohya``: ``kohya/lora_kohya.safetensors``, the one file A1111, ComfyUI and sd-scripts read (LoRA layers as kohya
LoRA, LoHa / LoKr / output-side OFT as LyCORIS modules, textual inversion's embeddings bundled as A1111 reads them:
:func:`visionpeft.checkpoint.exporters.export_kohya`). What the format cannot hold is refused before training, in one
line (:func:`check_exports`), not after it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

import visionpeft as vp

from ..adapter import unwrap
from ..checkpoint.exporters import KOHYA_NAME, kohya_state_dict
from ..errors import CheckpointError, ConfigError

#: ``train.export`` value -> (folder in the run folder, the file written there, what builds its tensors)
EXPORTS = {"kohya": ("kohya", KOHYA_NAME, kohya_state_dict)}


def check_exports(model: nn.Module, formats: list[str]) -> None:
    """Whether ``model``'s attached methods (at their initial state) can be written in each of ``formats``.

    Raises:
        ConfigError: A method the format cannot hold (BOFT, DoRA, ControlNet in kohya's layout; a textual inversion
            token with a dot), naming ``train.export`` and why.
    """
    for format in formats:
        try:
            EXPORTS[format][2](unwrap(model))
        except CheckpointError as err:
            raise ConfigError(f"train.export names {format}, which this run cannot write: {err}") from None


def write_exports(model: nn.Module, run_dir: Path, formats: list[str]) -> list[Path]:
    """Writes ``model``'s adapter in each of ``formats`` under ``run_dir``; returns the files written."""
    written = []
    for format in formats:
        folder, name, _ = EXPORTS[format]
        vp.save_adapter(model, run_dir / folder, format=format)
        written.append(run_dir / folder / name)
    return written
