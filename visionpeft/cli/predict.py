"""Segment new images with a trained run: ``python tools/predict.py RUN_DIR img1.jpg img2.png ... --out masks/``.

Rebuilds the segmenter from the run's ``config.yaml`` (same pretrained weights), loads its ``best`` (else
``last``) adapter, and writes for each image ``<stem>.png`` (the label ids, 8-bit grayscale) and
``<stem>_color.png`` (the classes in the run's palette), at the image's own size. Images are resized as the run
evaluated them (``data.scale``) and inferred whole or with sliding windows (``--mode``, default the run's
``eval.mode``). Every image is read before the model loads: a missing or broken one is one line, exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_base_check_argument


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="visionpeft predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a segmentation run folder")
    parser.add_argument("images", type=Path, nargs="+", help="image files")
    parser.add_argument("--out", type=Path, required=True, help="folder receiving the masks")
    parser.add_argument("--checkpoint", default=None, help="best or last (default: best if present)")
    parser.add_argument("--mode", choices=("whole", "slide"), default=None, help="default: the run's eval.mode")
    parser.add_argument("--cpu", action="store_true", help="force the CPU even when a GPU is present")
    add_base_check_argument(parser)
    args = parser.parse_args(argv)

    from visionpeft.config import load_config
    from visionpeft.data.images import load_rgb
    from visionpeft.errors import CheckpointError, ConfigError

    config_path = args.run_dir / "config.yaml"
    if not config_path.is_file():
        raise CheckpointError(f"{args.run_dir} is not a run folder (no config.yaml)")
    config = load_config(config_path)
    if config.task != "segmentation":
        raise ConfigError(f"{args.run_dir} is a {config.task} run; predict segments with segmentation runs")
    name = args.checkpoint or ("best" if (args.run_dir / "best").exists() else "last")
    images = [load_rgb(path) for path in args.images]  # every image checked before the model loads
    stems = [path.stem for path in args.images]
    if len(set(stems)) != len(stems):
        raise ConfigError("two images share a file name stem; their masks would overwrite each other")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {args.out}: cannot create the folder ({err.strerror or err})") from None

    import torch

    from visionpeft.data.segmentation import SegmentationTransform
    from visionpeft.data.transforms import normalization_of
    from visionpeft.tasks.seg_inference import predict_labels
    from visionpeft.trainers.seg_outputs import colorize
    from visionpeft.trainers.segmentation import load_segmenter

    seg = load_segmenter(config, args.run_dir / name, check_base=not args.ignore_base_mismatch)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    seg.to(device)
    mean, std = normalization_of(seg.inner_model())
    transform = SegmentationTransform(False, scale=tuple(config.data.scale), mean=mean, std=std)
    mode, cfg = args.mode or config.eval.mode, config.eval
    palette = seg.metadata.get("palette")
    from PIL import Image

    for image, stem in zip(images, stems):
        tensor, _ = transform(image, Image.new("L", image.size))
        labels = (
            predict_labels(
                seg, [tensor.to(device)], [(image.height, image.width)], mode, tuple(cfg.crop), tuple(cfg.stride)
            )[0]
            .cpu()
            .numpy()
            .astype("uint8")
        )
        Image.fromarray(labels, "L").save(args.out / f"{stem}.png")
        colorize(labels, palette).save(args.out / f"{stem}_color.png")
    print(f"wrote {2 * len(images)} masks for {len(images)} image(s) to {args.out} ({name} adapter, {mode} inference)")
    return 0
