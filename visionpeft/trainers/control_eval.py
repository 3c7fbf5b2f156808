"""A saved control run: evaluated on held-out pairs (fill50k data: new pairs from the same generator and colours,
none of them a training pair, scored by the fill IoU) or by the validation grid of training pairs (other data, which
holds nothing out), and applied to new condition images. Sampling is the trainer's own
(:meth:`ControlValidation.draw` / :meth:`ControlValidation.sample`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ..data.conditions import make_condition
from ..data.control_pairs import ControlPairs, condition_transform
from ..data.fill50k import make_fill50k
from ..data.images import load_rgb
from ..errors import ConfigError
from .control import ControlValidation
from .control_inputs import condition_columns, control_methods
from .saved_run import (
    EvalRequest,
    PredictRequest,
    adapted_pipeline,
    adapter_dir,
    check_outputs,
    eval_folder,
    output_folder,
    png_bytes,
    readable_grid,
    write_new,
)

#: held-out pairs come from the generator seeded with the training data's seed plus this
HELD_OUT_SEED_OFFSET = 1


def _sampler(config: DictConfig, adapter: Path, pairs: ControlPairs, cpu: bool, check_base: bool):
    """(the trainer's validation of ``pairs`` around the run's pipeline with ``adapter`` loaded, an accelerator)."""
    pipeline, accelerator = adapted_pipeline(config.model, adapter, cpu, check_base)
    return ControlValidation(pipeline, config, adapter.parent, pairs), accelerator


def fill_palette(records: list[dict]) -> list[str] | None:
    """The CSS4 colour names of fill50k records (read back from their captions, "pale golden rod circle with old
    lace background"), or None when the records are not fill50k pairs."""
    names = set()
    for record in records:
        fill, with_, rest = str(record.get("text", "")).partition(" circle with ")
        if "circle" not in record or not with_ or not rest.endswith(" background"):
            return None
        names |= {fill.replace(" ", ""), rest.removesuffix(" background").replace(" ", "")}
    return sorted(names)


def held_out_pairs(config: DictConfig, train: ControlPairs, palette: list[str], count: int, folder: Path):
    """``count`` new fill50k pairs in ``folder`` (same size and colours as the training pairs, another seed, none
    equal to a training pair) as validation pairs, or None when the generator cannot make them."""
    card = train.root / "card.json"
    seed = (json.loads(card.read_text()).get("seed", 0) if card.is_file() else 0) + HELD_OUT_SEED_OFFSET
    seen = {(tuple(r["circle"]), tuple(r["fill"]), tuple(r["background"])) for r in train.records}
    try:
        make_fill50k(folder, n=2 * count, size=int(train.records[0]["size"]), seed=int(seed), palette=palette)
    except ValueError:
        return None
    pairs = ControlPairs(folder, config.data.size, 0.0, config.data.conditioning, train=False)
    pairs.records = [
        r for r in pairs.records if (tuple(r["circle"]), tuple(r["fill"]), tuple(r["background"])) not in seen
    ]
    pairs.records = pairs.records[:count]
    return pairs if pairs.records else None


def evaluate(config: DictConfig, request: EvalRequest) -> list[str]:
    """Fill IoU on ``--samples`` held-out pairs (default ``train.validation_pairs``) for fill50k data, else the
    validation grid of the first training pairs; ``grid.png`` (condition(s) | sample | target per row) either way."""
    if not config.data.root:
        raise ConfigError("the run's data.root is empty: eval samples its pairs")
    data = config.data
    train = ControlPairs(data.root, data.size, 0.0, data.conditioning, train=False, columns=condition_columns(config))
    count = request.samples or max(1, config.train.validation_pairs)
    adapter = adapter_dir(request.run_dir, request.checkpoint)
    validation, accelerator = _sampler(config, adapter, train, request.cpu, request.check_base)
    out = eval_folder(request, adapter.name)
    palette = fill_palette(train.records)
    held = held_out_pairs(config, train, palette, count, out / "held_out") if palette else None
    head = f"{request.run_dir} [{adapter.name}]"
    if held is None:
        validation.pairs = train
        rows, _ = validation.draw(accelerator, min(count, len(train)))
        readable_grid(rows).save(out / "grid.png")
        why = "they are not fill50k pairs" if palette is None else "the fill50k generator cannot remake their colours"
        return [
            f"{head} validation grid of {min(count, len(train))} training pairs: {out / 'grid.png'}",
            f"fill IoU not scored: nothing is held out of {data.root} and {why}",
        ]
    validation.pairs = held
    rows, scores = validation.draw(accelerator, len(held))
    readable_grid(rows).save(out / "grid.png")
    return [
        f"{head} {len(held)} held-out fill50k pairs ({out / 'held_out'}): fill_iou {float(np.mean(scores)):.4f} "
        f"(grid: {out / 'grid.png'})"
    ]


def input_groups(inputs: list[str], controls: list[str]) -> list[list[Path]]:
    """Each predict input as its images: one file (every control reads it), or, for a run with several controls,
    one file per control joined by commas (``edges.png,depth.png``: the i-th goes to the i-th control of the config,
    the order of ``data.conditioning_columns``). An existing file whose name holds a comma is one file."""
    groups = []
    for text in inputs:
        parts = [text] if "," not in text or Path(text).exists() else text.split(",")
        if len(parts) > 1 and len(parts) != len(controls):
            raise ConfigError(
                f"input '{text}' names {len(parts)} images for the run's {len(controls)} control(s) "
                f"({', '.join(controls)}): give one image for every control, or one per control joined by commas"
            )
        groups.append([Path(part) for part in parts])
    return groups


def predict(config: DictConfig, request: PredictRequest) -> list[str]:
    """One image per (input, seed) into ``request.out``: ``<stem>_seedS.png``, drawn under the input's condition
    (the input itself, or computed from it when the run computes its conditions). With several controls, an input is
    one image every control reads, or one image per control joined by commas (:func:`input_groups`; the output is
    named after their stems joined by ``+``)."""
    if not request.inputs:
        raise ConfigError("give one or more condition images (with --prompt TEXT)")
    groups = input_groups(request.inputs, control_methods(config))
    prompts = request.prompt * len(groups) if len(request.prompt) == 1 else request.prompt
    if len(prompts) != len(groups):
        raise ConfigError(
            f"{len(groups)} condition image(s) but {len(request.prompt)} --prompt; give one prompt, or one per image"
        )
    seeds = request.seeds or [config.train.seed]
    out = output_folder(request.out)
    names = [(i, seed) for i in range(len(groups)) for seed in seeds]
    stems = ["+".join(path.stem for path in group) for group in groups]
    outputs = [out / f"{stems[i]}_seed{seed}.png" for i, seed in names]
    check_outputs(outputs, [path for group in groups for path in group], request.overwrite)
    images = [[load_rgb(path) for path in group] for group in groups]  # every image checked before the model loads
    kind, transform = config.data.conditioning, condition_transform(config.data.size)

    def condition(image):
        return transform(image if kind == "none" else make_condition(image, kind, False))

    conditions = [[condition(image) for image in group] if len(group) > 1 else condition(group[0]) for group in images]
    adapter = adapter_dir(request.run_dir, request.checkpoint)
    validation, accelerator = _sampler(config, adapter, None, request.cpu, request.check_base)
    for (i, seed), path in zip(names, outputs):
        image = validation.sample(accelerator, conditions[i], prompts[i], seed)
        write_new(path, png_bytes(image), request.overwrite)
    made = "the inputs" if kind == "none" else f"{kind} maps of the inputs"
    return [f"wrote {len(outputs)} image(s) under {made} ({len(seeds)} seed(s) each) to {out} ({adapter.name})"]
