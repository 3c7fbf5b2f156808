"""The control demo: ControlNet, ControlNet-LoRA and T2I-Adapter on the embedded tiny pipeline learn to fill the
outlined circle.

    python tools/benchmark.py control-demo [--methods ...] [--steps 3000] [--checkpoint-every 500] [--seed 0]
    python tools/benchmark.py control-demo --from-json gallery/control/results.json   # rewrite README only
    python tools/benchmark.py control-demo --methods controlnet --ship checkpoints/tiny_sd_controlnet
    python tools/benchmark.py control-demo --methods controlnet controlnet_unlocked \
        --ship-unlocked checkpoints/tiny_sd_controlnet_unlocked

The tiny pipeline (``checkpoints/tiny_sd``) was pretrained on 32 px circles of an eight-colour palette with captions
("red circle with blue background") but never saw where a circle should go. Each method trains with the project's
control trainer (``configs/control/<method>_tiny_sd_fill.yaml``, ``tools/train.py``) on 2,000 fill50k pairs at
32 px in that palette, and is then scored on 64 held-out pairs (another generator seed) against the base pipeline
with the same prompts and seeds, for the step checkpoints of the run (``train.checkpoint_every``) and its end. Three
scores (:mod:`visionpeft.data.fill50k`): the fill IoU of each sample (the pixels of the caption's fill colour against
the outlined disc), and apart, the shape (the pixels that differ from the sample's own background against the disc)
and the colour (whether the disc's median colour is the caption's fill among the eight). Writes ``gallery/control/``:
``results.json``, ``README.md``, ``fill_iou.png`` (held-out fill and shape IoU over training steps) and
``samples_<method>.png`` (condition | base | controlled | target). ``--ship FOLDER`` also writes the trained
ControlNet's ``controlnet/`` folder there with a model card (how ``checkpoints/tiny_sd_controlnet`` was made).
``controlnet_unlocked`` is a second stage of that ControlNet, trained on with the U-Net's decoder unlocked
(:mod:`.control_unlocked`; ``--ship-unlocked FOLDER``: ``checkpoints/tiny_sd_controlnet_unlocked``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .control_scores import GUIDANCE, STEPS, improved, means, score
from .control_unlocked import decoder_costs, paragraph, seed_summary
from .control_unlocked import ship as ship_unlocked

ROOT = Path(__file__).resolve().parents[2]
METHODS = {
    "controlnet": "ControlNet",
    "controlnet_lora": "ControlNet-LoRA",
    "t2i_adapter": "T2I-Adapter",
    "controlnet_unlocked": "ControlNet, then U-Net decoder unlocked",
}
#: method -> the method whose finished run's diffusers folder it starts from (``model.init_control``)
STARTS = {"controlnet_unlocked": ("controlnet", "controlnet")}
TEST_PAIRS, SHOWN = 64, 8


def make_data(work: Path) -> tuple[Path, Path]:
    """Training pairs (seed 0) and held-out pairs (seed 1) in the tiny pipeline's palette."""
    from visionpeft.data.fill50k import make_fill50k
    from visionpeft.demo.captioned_mix import CIRCLE_COLOURS

    folders = (work / "fill32_train", work / "fill32_test")
    for folder, n, seed in zip(folders, (2000, TEST_PAIRS), (0, 1)):
        if not (folder / "metadata.jsonl").is_file():
            make_fill50k(folder, n=n, size=32, seed=seed, palette=CIRCLE_COLOURS)
    return folders


def train(
    method: str, data: Path, work: Path, steps: int, seed: int, every: int, threads: int, start_seed: int | None = None
) -> tuple[Path, float]:
    """One run through the training command (``threads`` CPU threads); returns its folder and minutes. A finished
    run in ``work`` is reused when it trained on the same base weights for the same steps and checkpoint interval
    (an edited config file is not noticed: remove the run's folder to train it again). A second stage starts from
    its first stage's run of ``start_seed`` (default: ``seed``)."""
    run_name = f"{method}-seed{seed}"
    run_dir = work / run_name
    overrides = [f"data.root={data}", f"optim.steps={steps}", f"train.checkpoint_every={every}"]
    weights = [ROOT / "checkpoints" / "tiny_sd"]
    if method in STARTS:  # a second stage, trained again when the first stage's result changed
        first, folder = STARTS[method]
        weights.append(work / f"{first}-seed{seed if start_seed is None else start_seed}" / folder)
        overrides.append(f"model.init_control={weights[-1]}")
    base = weights_digest(weights)
    finished = (run_dir / "README.md").is_file() and (run_dir / "base.txt").is_file()  # the card is written last
    if not finished or (run_dir / "base.txt").read_text().strip() != base or not same_length(run_dir, steps, every):
        config = ROOT / "configs" / "control" / f"{method}_tiny_sd_fill.yaml"
        timed_training(config, overrides, run_dir, seed, threads)
        (run_dir / "base.txt").write_text(base + "\n")
    return run_dir, float((run_dir / "minutes.txt").read_text())


def same_length(run_dir: Path, steps: int, every: int) -> bool:
    """Whether the finished run in ``run_dir`` trained ``steps`` steps with a checkpoint every ``every`` (a run of
    another length is trained again, not reused)."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(run_dir / "config.yaml")
    return config.optim.steps == steps and config.train.checkpoint_every == every


def timed_training(config: Path, overrides: list[str], run_dir: Path, seed: int, threads: int) -> None:
    """``tools/train.py CONFIG`` into ``run_dir`` (overwritten) with ``overrides`` and ``seed`` on ``threads`` CPU
    threads; its wall minutes go to ``run_dir/minutes.txt`` (what a finished run is recognised by)."""
    command = [sys.executable, str(ROOT / "tools" / "train.py"), str(config), *overrides, f"train.seed={seed}"]
    command += [f"train.output_dir={run_dir.parent}", f"train.run_name={run_dir.name}", "--overwrite"]
    start = time.time()
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=environment)
    (run_dir / "minutes.txt").write_text(f"{(time.time() - start) / 60:.2f}\n")


def weights_digest(folders: list[Path]) -> str:
    """sha256 of the weight files in ``folders`` (the shipped pipeline; a second stage's start): a finished run is
    reused only on the weights it trained on."""
    import hashlib

    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*.safetensors")):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, adapter folder) of the run's step checkpoints, oldest first."""
    return [(int(p.name.split("-")[1]), p) for p in sorted((run_dir / "checkpoints").glob("step-*"))]


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


def plot(curves: dict[str, dict], base: dict[str, float], path: Path) -> None:
    """Held-out fill IoU (left) and shape IoU (right) over training steps, the base pipeline dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    for ax, measure, label in zip(axes, ("fill", "shape"), ("fill IoU", "shape IoU")):
        for method, points in curves.items():
            points = points if method in STARTS else [(0, base), *points]  # a second stage starts at the first's end
            ax.plot([step for step, _ in points], [v[measure] for _, v in points], marker="o", label=METHODS[method])
        ax.axhline(base[measure], color="grey", linestyle=":", label="base pipeline (no control)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{label}, {TEST_PAIRS} held-out pairs")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_readme(results: dict, out: Path) -> None:
    base, vae = results["base"], results.get("vae")
    own = " | own decoder: fill / shape IoU" if vae else ""
    lines = [
        "# Control on the embedded tiny pipeline",
        "",
        f"Made by `{results['command']}` on a 2-core CPU shared with other jobs (minutes: wall time under that load). "
        f"Training: {results['train_pairs']:,} fill50k pairs at 32 px "
        f"in the tiny pipeline's eight colours, batch 16, {results['steps']:,} steps, half the captions empty "
        f"(ControlNet's paper), seed {results['seed']}. Score on {results['test_pairs']} held-out pairs (another "
        f"generator seed), {STEPS} DDIM steps, guidance {GUIDANCE}, sample seed = pair index, the same for base and "
        "controlled: the fill IoU (the pixels of the caption's fill colour against the outlined disc), and apart, the "
        "shape IoU (the pixels that differ from the sample's own background against the disc) and the colour (% of "
        "samples whose disc is the caption's fill colour, nearest of the eight).",
        *_decoder_paragraph(vae),
        "",
        f"| method | trainable params | fill IoU | pairs improved | shape IoU | pairs improved | fill colour right (%) "
        f"| minutes{own} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if vae else ""),
        f"| base pipeline (no control) | 0 | {base['fill']:.3f} | | {base['shape']:.3f} | | "
        f"{100 * base['colour']:.0f} | |{_own(base, vae)}",
    ]
    for method, row in results["methods"].items():
        lines.append(
            f"| {METHODS[method]} | {row['trainable']:,} | {row['fill']:.3f} | "
            f"{row['improved']}/{results['test_pairs']} | {row['shape']:.3f} | "
            f"{row['improved_shape']}/{results['test_pairs']} | {100 * row['colour']:.0f} | "
            f"{row['minutes']:.1f} |{_own(row, vae)}"
        )
    lines += [
        "",
        *_colour_paragraph(results),
        *_peak_sentence(results),
        *paragraph(results),
        "",
        "![held-out fill and shape IoU over training](fill_iou.png)",
        "",
    ]
    for method in results["methods"]:
        lines += [
            f"{METHODS[method]}: condition | base pipeline | with control | target (held-out pairs)",
            "",
            f"![{method}](samples_{method}.png)",
            "",
        ]
    (out / "README.md").write_text("\n".join(lines))


def _own(row: dict, vae: dict | None) -> str:
    return f" {row['own_fill']:.3f} / {row['own_shape']:.3f} |" if vae else ""


def _decoder_paragraph(vae: dict | None) -> list[str]:
    """With ``--vae``: which decoder draws the samples, and why."""
    if not vae:
        return []
    return [
        "",
        f"The samples decode through `{vae['folder']}`: tiny_sd's VAE with its decoder fine-tuned alone "
        "(`tools/finetune_vae_decoder.py`, Stability's sd-vae-ft-mse recipe). Its encoder is tiny_sd's, so the "
        "latents, and everything trained on them, are the same; only the pixels they decode to change. tiny_sd's own "
        "decoder renders the palette muted (red as grey, green as blue): decoding the encoded held-out targets "
        f"themselves, it scores a fill IoU of {vae['ceiling']:.3f}, a ceiling under any control; the fine-tuned "
        f"decoder scores {vae['tuned']:.3f}. The last column scores the same runs through tiny_sd's own decoder.",
    ]


def _colour_paragraph(results: dict) -> list[str]:
    """What the colour column says (without ``--vae``: why the fill IoU stays low)."""
    base = results["base"]
    if results.get("vae"):
        row = results["methods"].get("controlnet")
        split = (
            f" Where ControlNet's disc has the caption's colour its fill IoU is {row['fill_colour_right']:.3f}, where "
            f"it has another {row['fill_colour_wrong']:.3f}: the colour the text asks for (drawn in "
            f"{100 * base['colour']:.0f}% of samples without control, {100 * row['colour']:.0f}% with ControlNet) is "
            "what holds the mean fill IoU down."
            if row and "fill_colour_right" in row
            else ""
        )
        return [
            f"The disc has the caption's fill colour in {100 * base['colour']:.0f}% of base samples: the text decides "
            f"the colours, the control where the disc is.{split}"
        ]
    return [
        "The tiny pipeline renders the palette's colours loosely: its backgrounds come out muted (grey, beige) "
        "whatever the caption, and the disc it draws has the caption's fill colour in "
        f"{100 * base['colour']:.0f}% of base "
        "samples. The fill IoU counts only pixels within 60 (RGB distance) of the caption's fill, so it stays low for "
        "every method; the shape IoU scores what a control adds, where the disc is, and the colour column what the "
        "text still decides."
    ]


def _peak_sentence(results: dict) -> list[str]:
    """Where ControlNet's fill and shape IoU were highest over training, against their values at the end."""
    row = results["methods"].get("controlnet")
    if not row:
        return []
    best = {
        measure: max(((step, values[measure]) for step, values in row["curve"]), key=lambda point: point[1])
        for measure in ("fill", "shape")
    }
    return [
        "",
        f"ControlNet's fill IoU is highest at step {best['fill'][0]:,} ({best['fill'][1]:.3f}) and its shape IoU at "
        f"step {best['shape'][0]:,} ({best['shape'][1]:.3f}), against {row['fill']:.3f} and {row['shape']:.3f} at "
        f"step {results['steps']:,} (the curve).",
    ]


CARD = """# tiny_sd_controlnet

A ControlNet for the embedded tiny text-to-image pipeline (`checkpoints/tiny_sd`, 32 px), trained by visionpeft on
fill50k at 32 px in the pipeline's eight colours: the condition is a white circle outline on black, the caption names
the fill and background colours ("red circle with blue background"), and the sample fills the outlined disc.
It is a plain diffusers `ControlNetModel` folder ({trainable:,} parameters, fp32):

```python
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

controlnet = ControlNetModel.from_pretrained("checkpoints/tiny_sd_controlnet")
pipe = StableDiffusionControlNetPipeline.from_pretrained("checkpoints/tiny_sd", controlnet=controlnet)
image = pipe("red circle with blue background", image=outline, height=32, width=32, guidance_scale=3.0).images[0]
```

- **Training**: `{config}`, {steps:,} steps, batch 16, lr 1e-4 (constant), half the captions empty, seed {seed};
  {minutes:.1f} minutes on a shared 2-core CPU.
- **Held-out score** ({pairs} pairs of another generator seed, {sampling}): fill IoU {fill:.3f} (base pipeline
  {base_fill:.3f}), {improved}/{pairs} pairs improved; shape IoU {shape:.3f} (base {base_shape:.3f}),
  {improved_shape}/{pairs} pairs improved; fill colour right in {colour:.0f}% of samples (base {base_colour:.0f}%).
  {decoder} Pictures and the curve: `gallery/control/`.
- **Command**: `{command}`
"""

#: the card's sentence on the decoder the held-out samples went through
DECODED = {
    None: "The tiny pipeline renders the palette's colours loosely (muted backgrounds), which caps the fill IoU;\n  "
    "the shape IoU is what the control adds.",
    "tuned": "Samples decoded with `{folder}` (tiny_sd's VAE, decoder fine-tuned alone:\n  "
    '`pipe.vae = AutoencoderKL.from_pretrained("{folder}")`); through tiny_sd\'s own decoder, which renders the\n  '
    "palette muted, the same samples score fill IoU {own_fill:.3f}, shape IoU {own_shape:.3f}.",
}


def ship(run_dir: Path, row: dict, results: dict, folder: Path) -> None:
    """Copies the run's ``controlnet/`` folder to ``folder`` and writes its model card."""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(run_dir / "controlnet", folder)
    base = results["base"]
    (folder / "README.md").write_text(
        CARD.format(
            trainable=row["trainable"],
            config="configs/control/controlnet_tiny_sd_fill.yaml",
            steps=results["steps"],
            seed=results["seed"],
            minutes=row["minutes"],
            pairs=results["test_pairs"],
            sampling=f"{STEPS} DDIM steps, guidance {GUIDANCE}, sample seed = pair index",
            fill=row["fill"],
            base_fill=base["fill"],
            improved=row["improved"],
            improved_shape=row["improved_shape"],
            shape=row["shape"],
            base_shape=base["shape"],
            colour=100 * row["colour"],
            base_colour=100 * base["colour"],
            command=results["command"],
            decoder=DECODED["tuned"].format(**results["vae"], **row) if results.get("vae") else DECODED[None],
        )
    )
    print(f"wrote {folder}")


class OwnDecoder:
    """With ``--vae``: the samples decode through that VAE (same latents as the pipeline's, its decoder fine-tuned),
    and the final scores are also measured through the pipeline's own decoder, side by side."""

    def __init__(self, pipe, vae: Path | None, test: Path) -> None:
        self.pipe, self.vae, self.test, self.own = pipe, vae, test, pipe.vae
        if vae is not None:
            from visionpeft.backbones.diffusers_loading import replace_vae

            replace_vae(pipe, vae)

    def record(self) -> dict | None:
        """The VAE folder and its card's reconstruction fill IoU of held-out targets, before and after."""
        if self.vae is None:
            return None
        trained = json.loads((self.vae / "training.json").read_text())
        return {
            "folder": str(self.vae),
            "ceiling": trained["before"]["fill_iou"],
            "tuned": trained["after"]["fill_iou"],
        }

    def scores(self, adapter: Path | None) -> dict[str, float]:
        """``{"own_fill", "own_shape"}``: the held-out means through the pipeline's own decoder (empty without
        ``--vae``)."""
        if self.vae is None:
            return {}
        tuned, self.pipe.vae = self.pipe.vae, self.own
        try:
            own = means(score(self.pipe, self.test, adapter)[0])
        finally:
            self.pipe.vae = tuned
        return {"own_fill": own["fill"], "own_shape": own["shape"]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of training and scoring")
    parser.add_argument("--checkpoint-every", type=int, help="steps between scored checkpoints (default: a sixth)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "control_demo")
    parser.add_argument("--out", type=Path, default=ROOT / "gallery" / "control")
    parser.add_argument("--ship", type=Path, help="also write the trained ControlNet here with its model card")
    parser.add_argument(
        "--ship-unlocked", type=Path, help="also write the second stage's controlnet/ and unet/ here with a card"
    )
    parser.add_argument(
        "--unlocked-seeds",
        type=int,
        nargs="*",
        default=[1],
        help="further training seeds of controlnet_unlocked from the same first stage (final scores only)",
    )
    parser.add_argument("--from-json", type=Path, help="rewrite README.md from a results.json")
    parser.add_argument(
        "--vae",
        type=Path,
        help="decode the samples with this VAE folder (the same latents, a fine-tuned decoder; training unchanged)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        write_readme(json.loads(args.from_json.read_text()), args.out)
        return 0
    if (args.ship or "controlnet_unlocked" in args.methods) and "controlnet" not in args.methods:
        parser.error("--ship and controlnet_unlocked need the ControlNet: include controlnet in --methods")
    if args.ship_unlocked and "controlnet_unlocked" not in args.methods:
        parser.error("--ship-unlocked writes the second stage: include controlnet_unlocked in --methods")
    import torch

    from .diffusion_demo import load_pipe

    torch.set_num_threads(args.threads)
    train_data, test_data = make_data(args.work)
    pipe = load_pipe(ROOT / "checkpoints" / "tiny_sd")
    own_decoder = OwnDecoder(pipe, args.vae, test_data)
    base_scores, base_images, _ = score(pipe, test_data, None)
    results = {
        "command": " ".join(["python tools/benchmark.py control-demo", *argv]),
        "steps": args.steps,
        "seed": args.seed,
        "vae": own_decoder.record(),
        "train_pairs": 2000,
        "test_pairs": TEST_PAIRS,
        "base": means(base_scores) | own_decoder.scores(None),
        "methods": {},
    }
    curves = {}
    every = args.checkpoint_every or max(1, args.steps // 6)
    for method in args.methods:
        run_dir, minutes = train(method, train_data, args.work, args.steps, args.seed, every, args.threads)
        first = STARTS.get(method, (None,))[0]  # a second stage's curve goes on from where its first stage ended
        offset = args.steps if first else 0
        curves[method] = [results["methods"][first]["curve"][-1]] if first else []
        curves[method] += [
            (offset + step, means(score(pipe, test_data, folder)[0]))
            for step, folder in checkpoints(run_dir)
            if step < args.steps
        ]
        scores, images, trainable = score(pipe, test_data, run_dir / "last")
        curves[method].append((offset + args.steps, means(scores)))
        picture(test_data, {"base": base_images, "controlled": images}, args.out / f"samples_{method}.png")
        row = results["methods"][method] = {
            **means(scores),
            **own_decoder.scores(run_dir / "last"),
            "improved": improved(scores, base_scores, "fill"),
            "improved_shape": improved(scores, base_scores, "shape"),
            "trainable": trainable,
            "minutes": minutes,
            "curve": curves[method],
        }
        if method == "controlnet_unlocked":
            row |= decoder_costs(pipe, run_dir, test_data)
            row["seeds"] = [{"seed": args.seed, **seed_summary(scores, base_scores, minutes)}]
            extra_seeds = [seed for seed in dict.fromkeys(args.unlocked_seeds) if seed != args.seed]
            for seed in extra_seeds:  # more training seeds of the second stage, from the same first stage
                extra, extra_minutes = train(
                    method, train_data, args.work, args.steps, seed, args.steps, args.threads, start_seed=args.seed
                )
                extra_scores = score(pipe, test_data, extra / "last")[0]
                row["seeds"].append({"seed": seed, **seed_summary(extra_scores, base_scores, extra_minutes)})
        print(f"{method}: fill IoU {results['base']['fill']:.3f} -> {row['fill']:.3f}")
        if method == "controlnet" and args.ship:
            ship(run_dir, row, results, args.ship)
        if method == "controlnet_unlocked" and args.ship_unlocked:
            ship_unlocked(run_dir, row, results["methods"]["controlnet"], results, args.ship_unlocked)
    plot(curves, results["base"], args.out / "fill_iou.png")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_readme(results, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
