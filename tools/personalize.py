"""Personalize a Stable Diffusion pipeline from a few images (textual inversion, DreamBooth-LoRA, DiffFit).

    python tools/personalize.py configs/personalize/textual_inversion_sd15.yaml data.images=DIR token="<my-cat>"
    python tools/personalize.py --resume RUN_DIR

The run folder receives config.yaml, metrics.jsonl, validation images, ``adapter/`` (visionpeft), ``diffusers/``
(files ``pipeline.load_lora_weights`` / ``load_textual_inversion`` read) and ``merged/unet`` for DiffFit.
"""

from __future__ import annotations

import argparse
import sys

from _cli import add_run_arguments, resolve_run, run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    args = parser.parse_intermixed_args(argv)

    from visionpeft.trainers.personalization import PersonalizeConfig
    from visionpeft.trainers.personalization import run as personalize

    config, run_dir = resolve_run(args, parser, PersonalizeConfig)
    result = personalize(config, run_dir, resume=args.resume is not None, cpu=args.cpu, stop_after=args.stop_after)
    for path in result["outputs"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
