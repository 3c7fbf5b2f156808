"""What a segmentation run leaves besides the shared outputs: colour masks, their legend (class id, name and colour),
the prediction grid (image | truth | prediction of fixed evaluation images, with the legend beside them; in the run
folder and TensorBoard) and the per-class IoU table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.utils.data import Dataset

from ..data.segmentation import SegmentationTransform
from ..data.segmentation.classes import default_palette
from ..data.transforms import normalization_of
from ..metrics.segmentation import per_class_table
from ..tasks.seg_inference import predict_labels

#: Colour of ignored pixels in pictures.
IGNORED = (224, 224, 192)  # VOC's colour of void pixels
#: Tiles of the grid are enlarged (nearest) to at least this height, so small demo images stay readable.
MIN_TILE = 128
#: Legend rows: height, colour swatch side and margin, in pixels.
LEGEND_ROW, LEGEND_SWATCH, LEGEND_MARGIN = 16, 12, 4


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]] | None, ignore_index: int = 255) -> Image.Image:
    """A label map as an RGB picture: class ``i`` in ``palette[i]`` (a default palette when None), ignored pixels
    in VOC's void colour."""
    colours = np.array(list(palette) if palette else default_palette(int(labels.max(initial=0)) + 1), np.uint8)
    table = np.zeros((256, 3), np.uint8)
    table[: min(256, len(colours))] = colours[:256]
    table[ignore_index] = IGNORED
    return Image.fromarray(table[np.asarray(labels, dtype=np.uint8)], "RGB")


def legend_colours(classes: Sequence[str], palette: Sequence[Sequence[int]] | None) -> list[tuple[int, ...]]:
    """The colour of each class in pictures: ``palette``, else the default palette :func:`colorize` uses."""
    return [tuple(int(v) for v in c) for c in (list(palette) if palette else default_palette(len(classes)))]


def legend_image(
    classes: Sequence[str], palette: Sequence[Sequence[int]] | None, max_height: int | None = None
) -> Image.Image:
    """The colour legend of the masks: a swatch and ``id name`` per class, in columns no taller than
    ``max_height`` (one column when None)."""
    font = ImageFont.load_default()
    labels = [f"{i} {name}" for i, name in enumerate(classes)]
    usable = (max_height or 0) - 2 * LEGEND_MARGIN
    per_column = max(1, usable // LEGEND_ROW) if max_height else max(1, len(labels))
    columns = [list(range(start, min(start + per_column, len(labels)))) for start in range(0, len(labels), per_column)]
    text_width = max(int(font.getbbox(text)[2]) for text in labels) if labels else 0
    column_width = LEGEND_SWATCH + 2 * LEGEND_MARGIN + text_width + 2 * LEGEND_MARGIN
    rows = max((len(c) for c in columns), default=0)
    picture = Image.new(
        "RGB", (max(1, len(columns)) * column_width, rows * LEGEND_ROW + 2 * LEGEND_MARGIN), (255, 255, 255)
    )
    draw, colours = ImageDraw.Draw(picture), legend_colours(classes, palette)
    for c, column in enumerate(columns):
        for r, index in enumerate(column):
            left, top = c * column_width + LEGEND_MARGIN, LEGEND_MARGIN + r * LEGEND_ROW
            offset = (LEGEND_ROW - LEGEND_SWATCH) // 2
            box = (left, top + offset, left + LEGEND_SWATCH - 1, top + offset + LEGEND_SWATCH - 1)
            draw.rectangle(box, fill=colours[index], outline=(0, 0, 0))
            draw.text((left + LEGEND_SWATCH + LEGEND_MARGIN, top + 2), labels[index], fill=(0, 0, 0), font=font)
    return picture


def _tile(image: Image.Image) -> Image.Image:
    factor = max(1, -(-MIN_TILE // image.height))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


@torch.no_grad()
def prediction_grid(
    model: nn.Module, dataset: Dataset, config: Any, palette: Sequence | None, classes: Sequence[str] | None = None
) -> Image.Image:
    """Rows image | truth | prediction of the first ``eval.grid_images`` items of ``dataset`` (PIL items), with the
    legend of ``classes`` (default: the dataset's) at the right."""
    mean, std = normalization_of(model.inner_model())
    ignore = int(getattr(dataset, "ignore_index", 255))
    transform = SegmentationTransform(False, scale=tuple(config.data.scale), mean=mean, std=std, ignore_index=ignore)
    device = next(model.parameters()).device
    cfg = config.eval
    rows = []
    for index in range(min(cfg.grid_images, len(dataset))):
        image, mask = dataset[index]
        tensor, target = transform(image, mask)
        pred = predict_labels(
            model, [tensor.to(device)], [target.shape[-2:]], cfg.mode, tuple(cfg.crop), tuple(cfg.stride)
        )[0]
        tiles = [image.convert("RGB"), colorize(target.numpy(), palette, ignore), colorize(pred.cpu().numpy(), palette)]
        rows.append([_tile(t) for t in tiles])
    width, height = max(sum(t.width for t in row) for row in rows), sum(row[0].height for row in rows)
    legend = legend_image(classes if classes is not None else dataset.classes, palette, max_height=height)
    grid = Image.new("RGB", (width + legend.width, max(height, legend.height)), (255, 255, 255))
    top = 0
    for row in rows:
        left = 0
        for tile in row:
            grid.paste(tile, (left, top))
            left += tile.width
        top += row[0].height
    grid.paste(legend, (width, 0))
    return grid


def write_outputs(run_dir: Path, last: dict, classes: list[str], grid: Image.Image | None) -> list[Path]:
    """Writes ``per_class_iou.md`` (from the latest evaluation) and ``predictions.png``."""
    written = []
    if last:
        path = run_dir / "per_class_iou.md"
        path.write_text(per_class_table(last, classes))
        written.append(path)
    if grid is not None:
        path = run_dir / "predictions.png"
        grid.save(path)
        written.append(path)
    return written
