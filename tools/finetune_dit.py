"""Class-conditional fine-tuning of a DiT pipeline on a labelled dataset (DiffFit's setting).

    python tools/finetune_dit.py configs/class_conditional/difffit_dit_xl2_256.yaml data.root=DIR
    python tools/finetune_dit.py --resume RUN_DIR

``data.root`` holds ``train/<class>/<image>`` (any dataset of the toolkit works through ``data.name``). The run
folder receives config.yaml, metrics.jsonl, validation grids (one row per ``train.validation_classes`` entry),
``adapter/`` (visionpeft) and ``merged/``: a complete DiTPipeline folder, loaded by
``DiTPipeline.from_pretrained(RUN/merged)``, whose ``get_label_ids`` knows the new class names.
"""

from __future__ import annotations

import argparse
import sys

from _cli import add_run_arguments, resolve_run, run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    args = parser.parse_intermixed_args(argv)

    from visionpeft.trainers.class_conditional import ClassConditionalConfig
    from visionpeft.trainers.class_conditional import run as finetune

    config, run_dir = resolve_run(args, parser, ClassConditionalConfig)
    result = finetune(config, run_dir, resume=args.resume is not None, cpu=args.cpu, stop_after=args.stop_after)
    for path in result["outputs"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
