"""The segmentation demo: every method on the project's FractalDB-pretrained tiny ViT with the DINOv2 linear head on
four blocks, on the texture mosaic (real texture pixels, exact labels; test regions from unseen photograph halves).

    python tools/benchmark.py segment-demo [--methods linear vpt lora ...] [--steps 80] [--seeds 0 1 2]
    python tools/benchmark.py segment-demo --from-json gallery/segment_results.json   # redraw only
    python tools/benchmark.py segment-demo --resume   # run only the (method, seed) pairs the saved json lacks

Each run is ``configs/segmentation/<method>_tiny_mosaic.yaml`` with the given steps / batch / seed (32 px training
crops, whole 64 px test mosaics). Writes ``gallery/segment_results.md`` (test mIoU / aAcc, mean +- std over seeds,
trainable parameters), ``gallery/segment_results.json`` (the command and every run) and
``gallery/segment_predictions.png`` (test mosaics: image | truth | each method's prediction, first seed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "segmentation"
METHODS = [
    "linear",
    "vpt",
    "lora",
    "adaptformer",
    "convpass",
    "bitfit",
    "ssf",
    "ln_tune",
    "fact",
    "repadapter",
    "adapter",
    "full",
]
DESCRIPTIONS = {
    "linear": "head only",
    "vpt": "VPT-deep, 8 tokens",
    "lora": "LoRA r 8 on q, v",
    "adaptformer": "AdaptFormer, bottleneck 16",
    "convpass": "Convpass, dim 8, s 0.1",
    "bitfit": "BitFit",
    "ssf": "SSF",
    "ln_tune": "LN tuning",
    "fact": "FacT-TT, dim 8",
    "repadapter": "RepAdapter, bottleneck 8",
    "adapter": "Houlsby adapters, bottleneck 8",
    "full": "full fine-tuning",
}
PICTURE_IMAGES = 4


def run_one(label: str, seed: int, steps: int, batch: int, runs: Path) -> tuple[dict, list]:
    """Trains one (method, seed); returns its result row and its label maps of the first test mosaics."""
    from visionpeft.config import load_config
    from visionpeft.trainers.segmentation import run

    name = f"mosaic-{label}-seed{seed}"
    overrides = [
        f"optim.steps={steps}",
        f"optim.warmup_steps={max(1, steps // 10)}",
        f"data.batch_size={batch}",
        f"train.seed={seed}",
        f"train.run_name={name}",
        f"train.output_dir={runs}",
        f"train.eval_every={steps}",
        "eval.grid_images=0",
    ]
    run_dir = runs / name
    shutil.rmtree(run_dir, ignore_errors=True)
    config = load_config(CONFIGS / f"{label}_tiny_mosaic.yaml", overrides)
    start = time.time()
    results = run(config, run_dir)
    seconds = time.time() - start
    counts = results["parameters"]
    row = {
        "method": label,
        "seed": seed,
        "steps": steps,
        "batch": batch,
        **results["test"],
        "trainable": counts["trainable"],
        "head": counts["by_group"].get("head", 0),
        "seconds": seconds,
    }
    return row, predictions(config, run_dir / "last")


def predictions(config, adapter_dir: Path) -> list:
    """Label maps (lists of rows) of the first test mosaics, predicted as the run evaluates."""
    import torch

    from visionpeft.data.segmentation import SegmentationTransform, build_segmentation_dataset
    from visionpeft.data.transforms import normalization_of
    from visionpeft.tasks.seg_inference import predict_labels
    from visionpeft.trainers.segmentation_eval import load_segmenter

    seg = load_segmenter(config, adapter_dir)
    test = build_segmentation_dataset("texture-mosaic", "test", **dict(config.data.options))
    mean, std = normalization_of(seg.inner_model())
    tf = SegmentationTransform(False, scale=tuple(config.data.scale), mean=mean, std=std)
    items = [tf(*test[i]) for i in range(PICTURE_IMAGES)]
    with torch.no_grad():
        labels = predict_labels(seg, [x for x, _ in items], [y.shape for _, y in items], "whole")
    return [label.tolist() for label in labels]


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def table(results: list[dict], methods: list[str], seeds: list[int], command: str) -> str:
    spread = f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]} only"
    first = results[0]
    lines = [
        "# Segmentation demo: the FractalDB-pretrained tiny ViT on the texture mosaic",
        "",
        f"Made by `{command}`",
        f"on a 2-core CPU shared with other jobs. {first['steps']} AdamW steps of {first['batch']} random 32 px crops",
        "(the tiny ViT's own size), linear head on blocks 2-5 (BN + 1x1 conv, DINOv2's protocol); test: 200 whole",
        "64 px mosaics (position embedding interpolated to the 16 x 16 grid) whose regions come from photograph",
        f"halves no training image uses. Test mIoU / aAcc (%), {spread}; chance aAcc is about 17 % (6 textures).",
        "Trainable parameters exclude the head "
        f"({first['head']:,}), which every method trains. Minutes: wall time per run on the shared machine.",
        "",
        "| method | trainable params (w/o head) | mIoU | aAcc | minutes |",
        "|---|---:|---:|---:|---:|",
    ]
    for label in methods:
        rows = [r for r in results if r["method"] == label]
        params = rows[0]["trainable"] - rows[0]["head"]
        minutes = statistics.fmean(r["seconds"] for r in rows) / 60
        lines.append(
            f"| {label} ({DESCRIPTIONS[label]}) | {params:,} | {_cell([r['mIoU'] for r in rows])} | "
            f"{_cell([r['aAcc'] for r in rows])} | {minutes:.1f} |"
        )
    return "\n".join(lines) + "\n"


def picture(maps: dict[str, list], methods: list[str], path: Path) -> None:
    """Rows of test mosaics: image | truth | one prediction per method (first seed), with a title row."""
    import numpy as np
    from PIL import Image, ImageDraw

    from visionpeft.data.segmentation import build_segmentation_dataset
    from visionpeft.trainers.seg_outputs import colorize

    test = build_segmentation_dataset("texture-mosaic", "test", size=64)
    palette = test.palette
    tile, title = 128, 16
    columns = ["image", "truth", *methods]
    canvas = Image.new("RGB", (tile * len(columns), title + tile * PICTURE_IMAGES), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((c * tile + 4, 2), name, fill=(0, 0, 0))
    for r in range(PICTURE_IMAGES):
        image, mask = test[r]
        tiles = [image.convert("RGB"), colorize(np.asarray(mask), palette)]
        tiles += [colorize(np.asarray(maps[m][r], dtype=np.uint8), palette) for m in methods]
        for c, t in enumerate(tiles):
            canvas.paste(t.resize((tile, tile), Image.NEAREST), (c * tile, title + r * tile))
    canvas.save(path)


def finished_runs(saved: Path, methods: list[str], seeds: list[int], steps: int, batch: int) -> tuple[list, dict]:
    """The rows (of ``methods`` x ``seeds``) and label maps of a saved json whose runs used ``steps`` and ``batch``:
    a seeded run gives the same numbers again, so ``--resume`` trains only what is missing."""
    if not saved.is_file():
        return [], {}
    record = json.loads(saved.read_text())
    rows = [
        r
        for r in record["runs"]
        if r["method"] in methods and r["seed"] in seeds and (r["steps"], r["batch"]) == (steps, batch)
    ]
    maps = {m: v for m, v in record["predictions"].items() if any(r["method"] == m for r in rows)}
    return rows, maps


def save(out: Path, command: str, results: list[dict], maps: dict) -> None:
    """Writes ``segment_results.json``: the command, every run's row and the first seed's label maps."""
    record = {"command": command, "runs": results, "predictions": maps}
    (out / "segment_results.json").write_text(json.dumps(record) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/benchmark.py segment-demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "gallery")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "segment-demo")
    parser.add_argument("--from-json", type=Path, help="redraw the table and picture from a saved json; no training")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs of the saved segment_results.json made with the same steps and batch; train the rest",
    )
    args = parser.parse_args(argv)

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        command, results, maps = saved["command"], saved["runs"], saved["predictions"]
        methods, seeds = (list(dict.fromkeys(r[k] for r in results)) for k in ("method", "seed"))
    else:
        methods, seeds, results, maps = args.methods, args.seeds, [], {}
        command = " ".join(
            [
                "python tools/benchmark.py segment-demo --steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--seeds",
                *map(str, seeds),
            ]
            + (["--methods", *methods] if methods != METHODS else [])
        )
        args.out.mkdir(parents=True, exist_ok=True)
        if args.resume:
            results, maps = finished_runs(args.out / "segment_results.json", methods, seeds, args.steps, args.batch)
        done = {(r["method"], r["seed"]) for r in results}
        for seed in seeds:
            for label in methods:
                if (label, seed) in done:
                    continue
                row, labels = run_one(label, seed, args.steps, args.batch, args.runs)
                results.append(row)
                maps.setdefault(label, labels)
                print(json.dumps(row), flush=True)
                save(args.out, command, results, maps)  # every finished run is kept, even if a later one fails
    args.out.mkdir(parents=True, exist_ok=True)
    save(args.out, command, results, maps)
    text = table(results, methods, seeds, command)
    (args.out / "segment_results.md").write_text(text)
    picture(maps, methods, args.out / "segment_predictions.png")
    print(text)
    return 0
