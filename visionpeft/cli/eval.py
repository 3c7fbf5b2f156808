"""Evaluate a trained adapter: ``python tools/eval.py RUN_DIR [--checkpoint best|last] [--split test]``.

Rebuilds the model from the run's ``config.yaml`` (same pretrained weights), loads the saved adapter and prints
top-1 / top-5 accuracy on the chosen split; for a segmentation run mIoU / aAcc / mAcc and the per-class IoU table
(``--mode whole|slide`` overrides the run's inference mode).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_base_check_argument, configure_logging, positive_int


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default=None, help="best or last (default: best if present)")
    parser.add_argument("--split", default=None, help="dataset split (default: the config's test split)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: the config's eval_batch_size")
    parser.add_argument(
        "--mode",
        choices=("whole", "slide"),
        default=None,
        help="segmentation: whole-image or sliding-window inference (default: the config's eval.mode)",
    )
    parser.add_argument("--cpu", action="store_true", help="force the CPU even when a GPU is present")
    add_base_check_argument(parser)
    args = parser.parse_args(argv)

    import torch

    import visionpeft as vp
    from visionpeft.config import load_config, methods_of_config
    from visionpeft.errors import CheckpointError, ConfigError
    from visionpeft.trainers.classification import (
        ClassificationObjective,
        Transformed,
        build_experiment,
        dataset_split,
        loader,
    )
    from visionpeft.trainers.loop import LoopConfig, make_accelerator

    configure_logging()

    config_path = args.run_dir / "config.yaml"
    if not config_path.is_file():
        raise CheckpointError(f"{args.run_dir} is not a run folder (no config.yaml)")
    config = load_config(config_path)
    name = args.checkpoint or ("best" if (args.run_dir / "best").exists() else "last")
    if config.task == "segmentation":
        return evaluate_segmentation(config, args, name)
    if args.mode:
        raise ConfigError("--mode (whole / slide inference) applies to segmentation runs only")
    exp = build_experiment(config)
    vp.detach(exp.model)  # a plain model: the checkpoint brings its own methods
    vp.load_adapter(exp.model, args.run_dir / name, check_base=not args.ignore_base_mismatch)
    loaded = [m for m, _ in vp.attached_methods(exp.model)]
    configured = [m for m, _ in methods_of_config(config)]
    if loaded != configured:
        print(
            f"warning: {args.run_dir / name} holds {' + '.join(loaded) or 'no method'}, not the run config's "
            f"{' + '.join(configured)}; evaluating what was loaded",
            file=sys.stderr,
        )
    split = args.split or config.data.test_split
    dataset = exp.test if split == config.data.test_split else None
    if dataset is None:
        from visionpeft.data import transforms as T
        from visionpeft.data.images import WorkerSafe

        data_cfg = T.data_config_of(exp.model)
        tf = T.build_transform(config.data.img_size, data_cfg, train=False, augment=config.data.augment)
        raw = dataset_split(config, split)
        dataset = WorkerSafe(Transformed(raw, tf))
    accelerator = make_accelerator(LoopConfig(), cpu=args.cpu)
    data_loader = accelerator.prepare(
        loader(dataset, args.batch_size or config.data.eval_batch_size, config.data.num_workers)
    )
    model = accelerator.prepare(exp.model).eval()
    with torch.no_grad():
        metrics = ClassificationObjective(len(exp.classes), data_loader).evaluate(model, accelerator)
    shown = ", ".join(f"{k} {100 * v:.2f}%" if k != "loss" else f"{k} {v:.4f}" for k, v in metrics.items())
    print(f"{args.run_dir} [{name}] {split}: {shown}")
    return 0


def evaluate_segmentation(config, args, name: str) -> int:
    """The segmentation branch of ``eval``: whole-split mIoU / aAcc / mAcc and the per-class table."""
    from visionpeft.metrics.segmentation import per_class_table
    from visionpeft.trainers.segmentation import evaluate_saved

    split = args.split or config.data.test_split
    result, classes = evaluate_saved(
        config,
        args.run_dir / name,
        split,
        args.mode,
        args.batch_size,
        cpu=args.cpu,
        check_base=not args.ignore_base_mismatch,
    )
    mode = args.mode or config.eval.mode
    print(per_class_table(result, classes), end="")
    print(
        f"{args.run_dir} [{name}] {split} ({mode}): "
        + ", ".join(f"{k} {result[k]:.2f}%" for k in ("mIoU", "aAcc", "mAcc"))
    )
    return 0
