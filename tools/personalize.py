"""Personalize a Stable Diffusion pipeline from a few images (textual inversion, DreamBooth-LoRA, DiffFit).

    python tools/personalize.py configs/personalize/textual_inversion_sd15.yaml data.images=DIR token="<my-cat>"
    python tools/personalize.py --resume RUN_DIR

The run folder receives config.yaml, metrics.jsonl, validation images, ``adapter/`` (visionpeft), ``diffusers/``
(files ``pipeline.load_lora_weights`` / ``load_textual_inversion`` read) and ``merged/unet`` for DiffFit.
"""

from __future__ import annotations

import sys

from _cli import run, run_trainer


def main(argv: list[str]) -> int:
    from visionpeft.trainers.personalization import PersonalizeConfig
    from visionpeft.trainers.personalization import run as personalize

    return run_trainer(argv, __doc__, PersonalizeConfig, personalize)


if __name__ == "__main__":
    sys.exit(run(main))
