"""The control demo's held-out scores: each pair sampled with a control (or the base pipeline) and scored three ways
(:mod:`visionpeft.data.fill50k`): the fill IoU, the shape IoU and whether the disc has the caption's fill colour."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

#: sampling of every held-out score: classifier-free guidance, DDIM steps, pairs per pipeline call
GUIDANCE, STEPS, BATCH = 3.0, 20, 16


def score(pipe, test: Path, adapter: Path | None) -> tuple[dict[str, list], list, int]:
    """Every held-out pair's sample (seed = pair index) scored three ways (``fill``: fill IoU; ``shape``: shape IoU;
    ``colour``: 1 if the disc's colour is the caption's fill), with the adapter loaded or the base pipeline; also the
    samples and the adapter's trainable parameter count (0 for the base pipeline)."""
    import contextlib

    import numpy as np
    import torch

    import visionpeft as vp
    from visionpeft.data.fill50k import fill_colour_named, fill_iou, shape_iou
    from visionpeft.data.images import load_rgb
    from visionpeft.demo.captioned_mix import CIRCLE_COLOURS

    records = [json.loads(line) for line in (test / "metadata.jsonl").read_text().splitlines()]
    trainable = vp.count_parameters(vp.load_adapter(pipe, adapter))["trainable"] if adapter is not None else 0
    scores, images = {"fill": [], "shape": [], "colour": []}, []
    for start in range(0, len(records), BATCH):  # a batch of pairs per call; each pair's noise from its own seed
        batch = records[start : start + BATCH]
        conditions = [np.asarray(load_rgb(test / record["conditioning_image"])) for record in batch]
        tensor = torch.from_numpy(np.stack(conditions)).permute(0, 3, 1, 2).float() / 255
        generators = [torch.Generator().manual_seed(start + i) for i in range(len(batch))]
        control = vp.conditioning(pipe, control_image=tensor) if adapter is not None else contextlib.nullcontext()
        with control:
            drawn = pipe(
                [record["text"] for record in batch],
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                generator=generators,
                height=32,
                width=32,
            ).images
        for image, record in zip(drawn, batch):
            scores["fill"].append(fill_iou(image, record))
            scores["shape"].append(shape_iou(image, record))
            scores["colour"].append(float(fill_colour_named(image, record, CIRCLE_COLOURS)))
            images.append(image)
    if adapter is not None:
        vp.detach(pipe)
    return scores, images, trainable


def means(scores: dict[str, list]) -> dict[str, float]:
    """The mean of each score, and ``fill_colour_right`` / ``fill_colour_wrong``: the mean fill IoU of the samples
    whose disc has the caption's colour / has another (0 when there are none)."""
    averages = {measure: statistics.mean(values) for measure, values in scores.items()}
    for name, wanted in (("fill_colour_right", 1.0), ("fill_colour_wrong", 0.0)):
        chosen = [fill for fill, colour in zip(scores["fill"], scores["colour"]) if colour == wanted]
        averages[name] = statistics.mean(chosen) if chosen else 0.0
    return averages


def improved(scores: dict[str, list], base: dict[str, list], measure: str) -> int:
    """How many held-out pairs score higher on ``measure`` (``fill``, ``shape``) than the base pipeline's sample of
    the same pair."""
    return sum(s > b for s, b in zip(scores[measure], base[measure]))
