"""Class-conditional fine-tuning of a DiT pipeline on a labelled dataset (DiffFit's setting).

    python tools/finetune_dit.py configs/class_conditional/difffit_dit_xl2_256.yaml data.root=DIR
    python tools/finetune_dit.py --resume RUN_DIR

``data.root`` holds ``train/<class>/<image>`` (any dataset of the toolkit works through ``data.name``). The run
folder receives config.yaml, metrics.jsonl, validation grids (one row per ``train.validation_classes`` entry),
``adapter/`` (visionpeft) and ``merged/``: a complete DiTPipeline folder, loaded by
``DiTPipeline.from_pretrained(RUN/merged)``, whose ``get_label_ids`` knows the new class names.
"""

from __future__ import annotations

import sys

from _cli import run, run_trainer


def main(argv: list[str]) -> int:
    from visionpeft.trainers.class_conditional import ClassConditionalConfig
    from visionpeft.trainers.class_conditional import run as finetune

    return run_trainer(argv, __doc__, ClassConditionalConfig, finetune)


if __name__ == "__main__":
    sys.exit(run(main))
