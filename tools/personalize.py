"""Personalize a Stable Diffusion pipeline from a few images (textual inversion, DreamBooth-LoRA, DiffFit).

    python tools/personalize.py configs/personalize/textual_inversion_sd15.yaml data.images=DIR token="<my-cat>"
    python tools/personalize.py --resume RUN_DIR

The run folder receives config.yaml, metrics.jsonl, validation images, ``adapter/`` (visionpeft), ``diffusers/``
(files ``pipeline.load_lora_weights`` / ``load_textual_inversion`` read) and ``merged/unet`` for DiffFit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _cli import run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--stop-after", type=int, help="train at most this many epochs now")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_intermixed_args(argv)

    from visionpeft.config import load_config
    from visionpeft.errors import ConfigError
    from visionpeft.trainers.personalization import PersonalizeConfig
    from visionpeft.trainers.personalization import run as personalize

    if args.resume:
        config, run_dir = load_config(args.resume / "config.yaml", schema_class=PersonalizeConfig), args.resume
    elif not args.config:
        parser.error("a config file is required (or --resume RUN_DIR)")
    else:
        config = load_config(args.config, args.overrides, schema_class=PersonalizeConfig)
        run_dir = Path(config.train.output_dir) / config.train.run_name
        if (run_dir / "state").exists():
            raise ConfigError(f"{run_dir} already holds a run; use --resume {run_dir} or another train.run_name")
    result = personalize(config, run_dir, resume=args.resume is not None, cpu=args.cpu, stop_after=args.stop_after)
    for path in result["outputs"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
