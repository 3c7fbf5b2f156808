"""The control demo: ControlNet and ControlNet-LoRA on the embedded tiny pipeline learn to fill the outlined circle.

    python tools/benchmark.py control-demo [--methods controlnet controlnet_lora] [--steps 400] [--seed 0]
    python tools/benchmark.py control-demo --from-json gallery/control/results.json   # rewrite README only

The tiny pipeline (``checkpoints/tiny_sd``) was pretrained on 32 px circles of an eight-colour palette with captions
("red circle with blue background") but never saw where a circle should go. Each method trains with the project's
control trainer (``configs/control/<method>_tiny_sd_fill.yaml``, ``tools/train.py``) on 2,000 fill50k pairs at
32 px in that palette, and is then scored on 64 held-out pairs (another generator seed): the fill IoU of each sample
(the pixels of the caption's fill colour against the outlined disc, :func:`visionpeft.data.fill50k.fill_iou`)
against the base pipeline's with the same prompts and seeds, for the step checkpoints of the run
(``train.checkpoint_every``) and its end. Writes ``gallery/control/``: ``results.json``, ``README.md``,
``fill_iou.png`` (held-out fill IoU over training steps) and ``samples_<method>.png`` (condition | base |
controlled | target).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METHODS = {"controlnet": "ControlNet", "controlnet_lora": "ControlNet-LoRA"}
GUIDANCE, STEPS, TEST_PAIRS, SHOWN = 3.0, 20, 64, 8


def make_data(work: Path) -> tuple[Path, Path]:
    """Training pairs (seed 0) and held-out pairs (seed 1) in the tiny pipeline's palette."""
    from visionpeft.data.fill50k import make_fill50k
    from visionpeft.demo.captioned_mix import CIRCLE_COLOURS

    folders = (work / "fill32_train", work / "fill32_test")
    for folder, n, seed in zip(folders, (2000, TEST_PAIRS), (0, 1)):
        if not (folder / "metadata.jsonl").is_file():
            make_fill50k(folder, n=n, size=32, seed=seed, palette=CIRCLE_COLOURS)
    return folders


def train(method: str, data: Path, work: Path, steps: int, seed: int) -> tuple[Path, float]:
    """One run through the training command; returns its folder and minutes."""
    run_name = f"{method}-seed{seed}"
    run_dir = work / run_name
    base = pipeline_digest()
    finished = (run_dir / "README.md").is_file() and (run_dir / "base.txt").is_file()  # the card is written last
    if not finished or (run_dir / "base.txt").read_text().strip() != base:  # kept only on the same base weights
        config = ROOT / "configs" / "control" / f"{method}_tiny_sd_fill.yaml"
        command = [
            sys.executable,
            str(ROOT / "tools" / "train.py"),
            str(config),
            f"data.root={data}",
            f"optim.steps={steps}",
            f"train.seed={seed}",
            f"train.output_dir={work}",
            f"train.run_name={run_name}",
            f"train.checkpoint_every={max(1, steps // 4)}",
            "--overwrite",
        ]
        start = time.time()
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        (run_dir / "minutes.txt").write_text(f"{(time.time() - start) / 60:.2f}\n")
        (run_dir / "base.txt").write_text(base + "\n")
    return run_dir, float((run_dir / "minutes.txt").read_text())


def pipeline_digest() -> str:
    """sha256 of the shipped pipeline's weight files: a finished run is reused only on the weights it trained on."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "checkpoints" / "tiny_sd").rglob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, adapter folder) of the run's step checkpoints, oldest first."""
    return [(int(p.name.split("-")[1]), p) for p in sorted((run_dir / "checkpoints").glob("step-*"))]


def score(pipe, test: Path, adapter: Path | None) -> tuple[list[float], list, int]:
    """Fill IoU of every held-out pair's sample (seed = pair index), with the adapter loaded or the base pipeline;
    also the adapter's trainable parameter count (0 for the base pipeline)."""
    import contextlib

    import numpy as np
    import torch

    import visionpeft as vp
    from visionpeft.data.fill50k import fill_iou
    from visionpeft.data.images import load_rgb

    records = [json.loads(line) for line in (test / "metadata.jsonl").read_text().splitlines()]
    trainable = vp.count_parameters(vp.load_adapter(pipe, adapter))["trainable"] if adapter is not None else 0
    scores, images = [], []
    for index, record in enumerate(records):
        condition = load_rgb(test / record["conditioning_image"])
        tensor = torch.from_numpy(np.asarray(condition)).permute(2, 0, 1)[None].float() / 255
        generator = torch.Generator().manual_seed(index)
        control = vp.conditioning(pipe, control_image=tensor) if adapter is not None else contextlib.nullcontext()
        with control:
            image = pipe(
                record["text"],
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                generator=generator,
                height=32,
                width=32,
            ).images[0]
        scores.append(fill_iou(image, record))
        images.append(image)
    if adapter is not None:
        vp.detach(pipe)
    return scores, images, trainable


def picture(test: Path, rows: dict[str, list], path: Path) -> None:
    """Columns condition | base | controlled | target for the first held-out pairs, 4x nearest upsampling."""
    from PIL import Image

    from visionpeft.data.images import load_rgb

    records = [json.loads(line) for line in (test / "metadata.jsonl").read_text().splitlines()][:SHOWN]
    tiles = [
        [load_rgb(test / r["conditioning_image"]) for r in records],
        rows["base"][:SHOWN],
        rows["controlled"][:SHOWN],
        [load_rgb(test / r["image"]) for r in records],
    ]
    sheet = Image.new("RGB", (34 * SHOWN, 34 * len(tiles)), (255, 255, 255))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            sheet.paste(tile.resize((32, 32)), (34 * c + 1, 34 * r + 1))
    sheet.resize((sheet.width * 4, sheet.height * 4), Image.NEAREST).save(path)


def plot(curves: dict[str, list], base: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for method, points in curves.items():
        ax.plot([0] + [s for s, _ in points], [base] + [v for _, v in points], marker="o", label=METHODS[method])
    ax.axhline(base, color="grey", linestyle=":", label="base pipeline (no control)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"fill IoU, {TEST_PAIRS} held-out pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_readme(results: dict, out: Path) -> None:
    lines = [
        "# Control on the embedded tiny pipeline",
        "",
        f"Made by `{results['command']}` on a 2-core CPU. Training: {results['train_pairs']:,} fill50k pairs at 32 px "
        f"in the tiny pipeline's eight colours, batch 16, {results['steps']} steps, seed {results['seed']}. "
        f"Score: fill IoU on {results['test_pairs']} held-out pairs (another generator seed), {STEPS} DDIM steps, "
        f"guidance {GUIDANCE}, sample seed = pair index, the same for base and controlled.",
        "",
        "| method | trainable params | fill IoU, base pipeline | fill IoU, with control | pairs improved | minutes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, row in results["methods"].items():
        lines.append(
            f"| {METHODS[method]} | {row['trainable']:,} | {results['base_iou']:.3f} | {row['iou']:.3f} | "
            f"{row['improved']}/{results['test_pairs']} | {row['minutes']:.1f} |"
        )
    lines += ["", "![held-out fill IoU over training](fill_iou.png)", ""]
    for method in results["methods"]:
        lines += [
            f"{METHODS[method]}: condition | base pipeline | with control | target (held-out pairs)",
            "",
            f"![{method}](samples_{method}.png)",
            "",
        ]
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "control_demo")
    parser.add_argument("--out", type=Path, default=ROOT / "gallery" / "control")
    parser.add_argument("--from-json", type=Path, help="rewrite README.md from a results.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        write_readme(json.loads(args.from_json.read_text()), args.out)
        return 0
    import torch

    from .diffusion_demo import load_pipe

    torch.set_num_threads(2)
    train_data, test_data = make_data(args.work)
    pipe = load_pipe(ROOT / "checkpoints" / "tiny_sd")
    base_scores, base_images, _ = score(pipe, test_data, None)
    results = {
        "command": " ".join(["python tools/benchmark.py control-demo", *argv]),
        "steps": args.steps,
        "seed": args.seed,
        "train_pairs": 2000,
        "test_pairs": TEST_PAIRS,
        "base_iou": statistics.mean(base_scores),
        "methods": {},
    }
    curves = {}
    for method in args.methods:
        run_dir, minutes = train(method, train_data, args.work, args.steps, args.seed)
        curves[method] = [
            (step, statistics.mean(score(pipe, test_data, folder)[0]))
            for step, folder in checkpoints(run_dir)
            if step < args.steps
        ]
        scores, images, trainable = score(pipe, test_data, run_dir / "last")
        curves[method].append((args.steps, statistics.mean(scores)))
        picture(test_data, {"base": base_images, "controlled": images}, args.out / f"samples_{method}.png")
        results["methods"][method] = {
            "iou": statistics.mean(scores),
            "improved": sum(s > b for s, b in zip(scores, base_scores)),
            "trainable": trainable,
            "minutes": minutes,
            "curve": curves[method],
        }
        print(f"{method}: fill IoU {results['base_iou']:.3f} -> {results['methods'][method]['iou']:.3f}")
    plot(curves, results["base_iou"], args.out / "fill_iou.png")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_readme(results, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
