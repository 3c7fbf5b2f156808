"""A saved segmentation run: evaluated again (mIoU / aAcc / mAcc and the per-class table, whole-image or sliding-window
inference) and applied to new images (a label mask and a colour mask per image, and the colour legend).

The segmenter is rebuilt from the run's config (same pretrained weights) with the adapter loaded; the classes and the
palette come from the adapter's record (``task.id2label`` / ``task.palette``), so ``predict`` reads no dataset.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image

import visionpeft as vp

from ..checkpoint.folder import adapter_config_path, read_adapter_config
from ..data.images import WorkerSafe, load_rgb
from ..data.segmentation import SegmentationTransform
from ..data.transforms import normalization_of
from ..errors import CheckpointError, ConfigError, DataError
from ..metrics.segmentation import per_class_table
from ..tasks.seg_inference import predict_labels
from ..tasks.segmenter import Segmenter
from .loop import LoopConfig, make_accelerator
from .saved_run import (
    EvalRequest,
    PredictRequest,
    adapter_dir,
    check_outputs,
    device_of,
    output_folder,
    png_bytes,
    write_new,
)
from .seg_outputs import colorize, legend_image
from .segmentation import Paired, SegmentationObjective, build_segmenter, check_sizes, eval_loader, raw_dataset

#: the colour legend ``predict`` writes beside the masks
LEGEND = "legend.png"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_colour(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(type(v) is int and 0 <= v <= 255 for v in value)


def recorded_classes(task: Any, adapter: Path) -> tuple[list[str], list[list[int]] | None]:
    """The class names and palette a segmentation adapter records (``task.id2label``: ``{"0": name, ...}``,
    ``task.palette``: one ``[r, g, b]`` of 0..255 per class, optional); a malformed record is a
    :class:`CheckpointError` naming the file and what is wrong."""
    where = adapter_config_path(adapter) or adapter
    if not isinstance(task, dict) or task.get("task") != "segmentation" or not isinstance(task.get("id2label"), dict):
        raise CheckpointError(f"{adapter} holds no segmentation adapter (no task record with id2label)")
    id2label, palette = task["id2label"], task.get("palette")
    ids = [str(i) for i in range(len(id2label))]
    if sorted(id2label) != sorted(ids) or not all(isinstance(id2label[i], str) for i in ids):
        raise CheckpointError(
            f"{where}: task.id2label must map the ids 0..{len(ids) - 1} (as strings) to class names, "
            f"got {_shown(id2label)}"
        )
    if palette is not None and not (
        isinstance(palette, list) and len(palette) == len(ids) and all(map(_is_colour, palette))
    ):
        raise CheckpointError(
            f"{where}: task.palette must be one [r, g, b] (integers 0..255) per class ({len(ids)}), "
            f"got {_shown(palette)}"
        )
    return [id2label[i] for i in ids], palette


def load_segmenter(config: DictConfig, adapter: Path, check_base: bool = True) -> Segmenter:
    """The segmenter of a run rebuilt from its config (same pretrained weights) with a saved adapter loaded."""
    classes, palette = recorded_classes(read_adapter_config(adapter).get("task") or {}, adapter)
    seg = build_segmenter(config, classes, palette)
    vp.load_adapter(seg, adapter, check_base=check_base)
    return seg.eval()


def evaluate_saved(
    config: DictConfig,
    adapter: Path,
    split: str,
    mode: str | None = None,
    batch_size: int | None = None,
    cpu: bool = False,
    check_base: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """mIoU / aAcc / mAcc (and per-class values) of a saved adapter on ``split``; returns them and the classes."""
    check_sizes(config)
    dataset = raw_dataset(config, split)
    seg = load_segmenter(config, adapter, check_base)
    classes = [str(c) for c in dataset.classes]
    if len(classes) != seg.num_classes:
        raise DataError(f"{adapter} predicts {seg.num_classes} classes; split '{split}' has {len(classes)}")
    mean, std = normalization_of(seg.inner_model())
    ignore = int(getattr(dataset, "ignore_index", 255))
    tf = SegmentationTransform(False, scale=tuple(config.data.scale), mean=mean, std=std, ignore_index=ignore)
    accelerator = make_accelerator(LoopConfig(), cpu=cpu)
    loader = accelerator.prepare(eval_loader(WorkerSafe(Paired(dataset, tf)), config, batch_size))
    eval_cfg = SimpleNamespace(**{**dict(config.eval), "mode": mode or config.eval.mode})
    objective = SegmentationObjective(len(classes), loader, eval_cfg, ignore)
    with torch.no_grad():
        objective.evaluate(accelerator.prepare(seg).eval(), accelerator)
    return objective.last, classes


def evaluate(config: DictConfig, request: EvalRequest) -> list[str]:
    """The per-class IoU table and one line of mIoU / aAcc / mAcc on ``request.split`` (default: the test split)."""
    adapter = adapter_dir(request.run_dir, request.checkpoint)
    split = request.split or config.data.test_split
    result, classes = evaluate_saved(
        config, adapter, split, request.mode, request.batch_size, cpu=request.cpu, check_base=request.check_base
    )
    mode = request.mode or config.eval.mode
    summary = ", ".join(f"{k} {result[k]:.2f}%" for k in ("mIoU", "aAcc", "mAcc"))
    return [per_class_table(result, classes), f"{request.run_dir} [{adapter.name}] {split} ({mode}): {summary}"]


def predict(config: DictConfig, request: PredictRequest) -> list[str]:
    """Writes ``<stem>_labels.png`` (class ids, 8-bit grayscale) and ``<stem>_color.png`` (the run's palette) per
    image at its own size, and ``legend.png`` (id, name and colour of each class) into ``request.out``. Images are
    resized as the run evaluated them (``data.scale``) and inferred whole or with sliding windows."""
    if not request.inputs:
        raise ConfigError("give one or more image files to segment")
    paths = [Path(p) for p in request.inputs]
    out = output_folder(request.out)
    masks = [out / f"{path.stem}{suffix}.png" for path in paths for suffix in ("_labels", "_color")]
    check_outputs(masks, paths, request.overwrite)
    images = [load_rgb(path) for path in paths]  # every image checked before the model loads
    adapter = adapter_dir(request.run_dir, request.checkpoint)
    check_sizes(config)
    classes, palette = recorded_classes(read_adapter_config(adapter).get("task") or {}, adapter)
    legend, legend_path = png_bytes(legend_image(classes, palette)), out / LEGEND
    legend_kept = legend_path.is_file() and legend_path.read_bytes() == legend  # the same legend may stay
    check_outputs([] if legend_kept else [legend_path], paths, request.overwrite)
    seg = load_segmenter(config, adapter, check_base=request.check_base)
    device = device_of(request.cpu)
    seg.to(device)
    mean, std = normalization_of(seg.inner_model())
    transform = SegmentationTransform(False, scale=tuple(config.data.scale), mean=mean, std=std)
    mode, cfg = request.mode or config.eval.mode, config.eval
    with torch.no_grad():
        for image, labels_path, colour_path in zip(images, masks[0::2], masks[1::2]):
            tensor, _ = transform(image, Image.new("L", image.size))
            size = [(image.height, image.width)]
            labels = predict_labels(seg, [tensor.to(device)], size, mode, tuple(cfg.crop), tuple(cfg.stride))[0]
            labels = labels.cpu().numpy().astype("uint8")
            write_new(labels_path, png_bytes(Image.fromarray(labels, "L")), request.overwrite)
            write_new(colour_path, png_bytes(colorize(labels, palette)), request.overwrite)
    if not legend_kept:
        write_new(legend_path, legend, request.overwrite)
    return [
        f"wrote {len(masks)} masks for {len(images)} image(s) and {LEGEND} to {out} "
        f"({adapter.name} adapter, {mode} inference)"
    ]
