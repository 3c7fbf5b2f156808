"""The [recipes] ablation: DreamBooth-LoRA on the held-out 7 of the embedded tiny pipeline with each training knob on.

    python tools/benchmark.py recipes-ablation [--seeds 0 1 2] [--samples 16] [--drift-samples 8] [--rows ...]
    python tools/benchmark.py recipes-ablation --from-json gallery/diffusion/ablation.json   # rewrite the table only

Every row trains ``configs/personalize/<recipe>_tiny_sd.yaml`` (the DreamBooth-LoRA recipe with one knob on, or
pivotal tuning) on the 5 images of the diffusion demo's subject (``gallery/diffusion/subject``), through the demo's
own launch / finish / sampling / judge (:mod:`benchmarks.diffusion_demo`); two processes at a time, one thread each
(a finished run's samples are drawn while the next trains). Per run: the judge's rate of seeing a 7 in the run's
prompt's samples before (the base pipeline) and after, and language drift: its rate of naming the prompted digit
for the other nine digits' prompts after against before (same sampling seeds), and the share of those samples it
calls a 7. Two rows train on subject sets made here from the same 5 images: ``masked`` on RGBA copies whose alpha
is the digit's ink (pixels above 64; the loss counts only there), ``buckets`` on copies padded with the black
background to 48 x 32, 32 x 48 and 40 x 32 (two stay 32 x 32). Without buckets the square centre crop of a padded
copy is the original image, so the buckets-off row on that set is the baseline row.

Writes ``gallery/diffusion/ablation.md``, ``ablation.json`` and ``ablation.png`` (seed 0: the subject prompt's
samples per row, then the samples of "a handwritten digit three").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .diffusion_demo import (
    ROOT,
    SUBJECT,
    finish,
    grid,
    launch,
    load_pipe,
    mean_std,
    sample,
    subject_images,
    subject_rate,
)

#: row -> (recipe under configs/personalize/ without ``_tiny_sd.yaml``, subject set, what the row turns on)
ROWS = {
    "baseline": ("dreambooth_lora", "subject", "none (DreamBooth-LoRA, r 4)"),
    "min_snr": ("dreambooth_lora_min_snr", "subject", "min-SNR-gamma 5"),
    "noise_offset": ("dreambooth_lora_noise_offset", "subject", "noise offset 0.05"),
    "huber": ("dreambooth_lora_huber", "subject", "pseudo-Huber loss (c 0.1, SNR schedule)"),
    "masked": ("dreambooth_lora_masked", "masked", "masked loss, the digit's ink"),
    "pivotal": ("pivotal_tuning", "subject", "pivotal tuning (a new token's embedding + the LoRA)"),
    "buckets": ("dreambooth_lora_buckets", "mixed", "aspect-ratio buckets, mixed-shape images"),
    "prior": ("dreambooth_lora_prior", "subject", 'prior preservation (50 class images of "a handwritten digit")'),
}
INK = 64  # a pixel above this (of 255) is the digit's ink: the masked row's loss mask
PADDED = {2: (48, 32), 3: (32, 48), 4: (40, 32)}  # the buckets row's subject images (width, height); 0, 1 stay 32
DRIFT_SHOWN = 3  # the digit whose prompt the picture shows after each row


def subject_sets(out: Path, work: Path) -> dict[str, Path]:
    """The three subject folders: the demo's 5 images (``out/subject``), RGBA copies with the ink as alpha, and
    copies padded to mixed shapes."""
    from PIL import Image

    chosen = subject_images(out / "subject")
    folders = {"subject": out / "subject", "masked": work / "subject_masked", "mixed": work / "subject_mixed"}
    for key in ("masked", "mixed"):
        folders[key].mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(chosen):
        ink = ((image.max(axis=-1) > INK) * 255).astype(np.uint8)
        Image.fromarray(np.dstack([image, ink]), "RGBA").save(folders["masked"] / f"{i}.png")
        width, height = PADDED.get(i, (32, 32))
        canvas = np.zeros((height, width, 3), np.uint8)
        top, left = (height - 32) // 2, (width - 32) // 2
        canvas[top : top + 32, left : left + 32] = image
        Image.fromarray(canvas).save(folders["mixed"] / f"{i}.png")
    return folders


def row_prompt(recipe: str) -> str:
    """The prompt a recipe trains on (its ``data.prompt`` with its token)."""
    from visionpeft.config import load_config

    config = load_config(ROOT / "configs" / "personalize" / f"{recipe}_tiny_sd.yaml", ["data.images=."])
    return config.data.prompt.format(config.token)


class Sampler:
    """Draws and judges the samples of a pipeline: the subject prompt (sampling seed = training seed, as the demo)
    and each other digit's prompt (sampling seed 1000 x seed + digit)."""

    def __init__(self, judge, count: int, drift_count: int, steps: int) -> None:
        from visionpeft.demo.captioned_mix import digit_prompt

        self.judge, self.count, self.drift_count, self.steps = judge, count, drift_count, steps
        self.others = [(d, digit_prompt(d)) for d in range(10) if f"digit {d}" != SUBJECT]

    def subject(self, pipe, prompt: str, seed: int):
        images = sample(pipe, prompt, self.count, seed=seed, steps=self.steps)
        return subject_rate(self.judge, images), images

    def drift(self, pipe, seed: int) -> dict:
        """The judge's rate of naming the prompted digit on the other digits' prompts, its rate of naming a 7 there,
        and the samples of the digit :data:`DRIFT_SHOWN`."""
        named, sevens, shown = [], [], None
        for digit, prompt in self.others:
            images = sample(pipe, prompt, self.drift_count, seed=1000 * seed + digit, steps=self.steps)
            predicted = self.judge.predict(images)
            named.append(np.mean([p == f"digit {digit}" for p in predicted]))
            sevens.append(np.mean([p == SUBJECT for p in predicted]))
            shown = images if digit == DRIFT_SHOWN else shown
        return {"named": float(np.mean(named)), "sevens": float(np.mean(sevens)), "shown": shown}


def after_run(sampler: Sampler, pipeline: Path, row: str, seed: int, info: dict, before: dict) -> tuple[dict, list]:
    """The finished run's record (rates after, against the base pipeline's ``before``) and its picture rows."""
    from visionpeft.cli.generate import apply_adapter

    tuned = load_pipe(pipeline)
    apply_adapter(tuned, Path(info["run_dir"]) / "adapter")
    after, images = sampler.subject(tuned, info["prompt"], seed)
    drift = sampler.drift(tuned, seed)
    record = {
        **info,
        "seed": seed,
        "before": before["subject"][info["prompt"]],
        "after": after,
        "others_before": before["drift"]["named"],
        "others_after": drift["named"],
        "sevens_elsewhere_before": before["drift"]["sevens"],
        "sevens_elsewhere_after": drift["sevens"],
    }
    print(
        f"{row} seed {seed}: a 7 in {100 * after:.0f}% (before {100 * record['before']:.0f}%); other digits "
        f"{100 * drift['named']:.0f}% named (before {100 * record['others_before']:.0f}%), "
        f"{100 * drift['sevens']:.0f}% 7s ({info['minutes']:.1f} min)",
        flush=True,
    )
    return record, [images, drift["shown"]]


def run_rows(args, judge) -> tuple[dict, dict]:
    """Trains every (row, seed), two processes at a time (a finished run is sampled in this process while the next
    trains); returns the records per row and the picture rows of the first seed."""
    folders = subject_sets(args.out, args.runs)
    sampler = Sampler(judge, args.samples, args.drift_samples, args.steps)
    base = load_pipe(args.pipeline)
    prompts = sorted({row_prompt(ROWS[row][0]) for row in args.rows})
    pending = [(row, seed) for seed in args.seeds for row in args.rows]
    running: list[tuple[str, int, dict]] = []
    befores: dict[int, dict] = {}
    records: dict[str, list] = {}
    pictures: dict[str, list] = {}
    while pending or running:
        while pending and len(running) < (1 if len(befores) < len(args.seeds) else 2):
            row, seed = pending.pop(0)
            recipe, subject, _ = ROWS[row]
            running.append(
                (row, seed, launch(recipe, seed, folders[subject], args.runs, args.pipeline, args.train_steps))
            )
        missing = [s for s in args.seeds if s not in befores]
        if missing:  # the base pipeline's samples, drawn while the first run trains
            seed = missing[0]
            drawn = {prompt: sampler.subject(base, prompt, seed) for prompt in prompts}
            befores[seed] = {"subject": {p: r for p, (r, _) in drawn.items()}, "drift": sampler.drift(base, seed)}
            if seed == args.seeds[0]:
                pictures["base"] = [drawn[prompts[0]][1], befores[seed]["drift"]["shown"]]
            continue
        done = next((job for job in running if job[2]["process"].poll() is not None), None)
        if done is None:
            time.sleep(2)
            continue
        running.remove(done)
        row, seed, job = done
        record, rows = after_run(sampler, args.pipeline, row, seed, finish(job), befores[seed])
        records.setdefault(row, []).append(record)
        if seed == args.seeds[0]:
            pictures[row] = rows
    return records, pictures


def summary(records: dict[str, list]) -> dict[str, dict]:
    """Per row: means and stds over seeds, and whether the rate after is below every baseline seed's (learning
    broken: outside the baseline's seed spread)."""
    floor = min(r["after"] for r in records["baseline"]) if "baseline" in records else None
    rows = {}
    for row, runs in records.items():
        after = [r["after"] for r in runs]
        rows[row] = {
            "after": statistics.mean(after),
            "after_std": statistics.stdev(after) if len(after) > 1 else 0.0,
            "others_after": statistics.mean(r["others_after"] for r in runs),
            "others_before": statistics.mean(r["others_before"] for r in runs),
            "sevens_elsewhere_after": statistics.mean(r["sevens_elsewhere_after"] for r in runs),
            "minutes": statistics.mean(r["minutes"] for r in runs),
            "breaks_learning": floor is not None and statistics.mean(after) < floor,
        }
    return rows


def write_table(results: dict, out: Path) -> None:
    """``ablation.md``: the table and picture of ``results`` (``ablation.json``), with its notes."""
    records, rows = results["records"], summary(results["records"])
    lines = [
        "# Training knobs on the embedded tiny pipeline: an ablation",
        "",
        f"Made by `{results['command']}` on a 2-core CPU shared with other jobs ({results['minutes']:.0f} minutes"
        " in all, two runs at a time).",
        "DreamBooth-LoRA on the 5 images of the held-out digit 7 (`gallery/diffusion/subject`, the"
        " [diffusion demo](README.md)'s), each row the recipe `configs/personalize/<recipe>_tiny_sd.yaml` with one"
        f" knob on; mean ± std over training seeds {results['seeds']}. Sampling: DDIM, {results['steps']} steps,"
        f" guidance 3.0; the judge (`checkpoints/tiny_sd_judge.safetensors`) reads {results['samples']} samples of"
        f" the run's prompt per seed (a 7 or not) and {results['drift_samples']} of each other digit's prompt"
        ' ("a handwritten digit three", ...: does it still draw that digit, or a 7?), before (the base pipeline,'
        " same sampling seeds) and after.",
        "",
        "| knob on | recipe | steps | a 7 after (%) | other digits named after (%) (before) | 7s drawn for other"
        " digits (%) | minutes per run |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row, r in rows.items():
        runs = records[row]
        broken = " **(below every baseline seed)**" if r["breaks_learning"] else ""
        lines.append(
            f"| {ROWS[row][2]} | `{ROWS[row][0]}` | {runs[0]['steps']} | "
            f"{mean_std([x['after'] for x in runs])}{broken} | "
            f"{100 * r['others_after']:.0f} ({100 * r['others_before']:.0f}) | "
            f"{100 * r['sevens_elsewhere_after']:.0f} | {r['minutes']:.1f} |"
        )
    lines += [
        "",
        f"Seed {results['seeds'][0]}, one row per knob (the base pipeline first): {results['samples']} samples of"
        f' the run\'s prompt | {results["drift_samples"]} of "a handwritten digit three": ![ablation](ablation.png)',
        "",
    ]
    if results.get("notes"):
        lines += ["## Reading the numbers", "", results["notes"], ""]
    (out / "ablation.md").write_text("\n".join(lines).rstrip() + "\n")


def picture(pictures: dict[str, list], out: Path) -> None:
    """``ablation.png``: per row (base first) 8 subject-prompt samples, then 8 of the digit :data:`DRIFT_SHOWN`."""
    order = ["base", *[row for row in ROWS if row in pictures]]
    grid([np.concatenate([pictures[row][0][:8], pictures[row][1][:8]]) for row in order], out / "ablation.png", cols=16)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/benchmark.py recipes-ablation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--samples", type=int, default=16, help="samples of each run's prompt per seed")
    parser.add_argument("--drift-samples", type=int, default=8, help="samples of each other digit's prompt per seed")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps (default: the recipes')")
    parser.add_argument("--pipeline", type=Path, default=ROOT / "checkpoints" / "tiny_sd")
    parser.add_argument("--out", type=Path, default=ROOT / "gallery" / "diffusion")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "recipes_ablation")
    parser.add_argument("--from-json", type=Path, default=None, help="rewrite ablation.md from an ablation.json")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        write_table(json.loads(args.from_json.read_text()), args.from_json.parent)
        return 0
    if not (args.pipeline / "model_index.json").is_file():
        print(f"error: {args.pipeline} is no pipeline folder; make checkpoints/tiny_sd first", file=sys.stderr)
        return 2
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from visionpeft.demo.judge import Judge

    diffusers_logging.disable_progress_bar()  # a pipeline load per run: no bars in the log
    transformers_logging.disable_progress_bar()
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    records, pictures = run_rows(args, Judge.load())
    results = {
        "command": " ".join(["python tools/benchmark.py recipes-ablation", *argv]),
        "seeds": args.seeds,
        "steps": args.steps,
        "samples": args.samples,
        "drift_samples": args.drift_samples,
        "minutes": (time.time() - start) / 60,
        "records": records,
        "summary": summary(records),
    }
    (args.out / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    picture(pictures, args.out)
    write_table(results, args.out)
    print(f"wrote {args.out / 'ablation.md'}")
    return 0
