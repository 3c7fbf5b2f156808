"""The IP-Adapter demo: does an image prompt make the embedded tiny pipeline draw what the reference image shows?

    python tools/benchmark.py ip-adapter-demo [--variants plain plus] [--seeds 0 1 2] [--steps 2000]
    python tools/benchmark.py ip-adapter-demo --from-json gallery/control/ip_adapter/results.json  # rewrite README

Each variant trains with the project's IP-Adapter trainer (``configs/control/ip_adapter{,_plus}_tiny_sd.yaml``,
``tools/train.py``) on the captioned mix (digit 7 and the brick texture held out), each image its own image prompt,
once per training seed. The image encoder is the embedded tiny CLIP's image tower
(``checkpoints/tiny_sd_image_encoder``).

Score: reference images are held-out *test* images of the digits (``--references`` of each held-in digit, and of the
never-seen 7). For reference ``i``, ``--samples`` images (sample seeds ``i * samples`` onwards, the same for every
way of drawing it) are drawn with the generic prompt
"a handwritten digit" three ways, and the judge (``checkpoints/tiny_sd_judge.safetensors``) says which subject each
shows; the rate is the share that shows the reference's digit:

* text alone: the base pipeline (no image prompt);
* image prompt: the IP-Adapter with the reference as image prompt (scale 1);
* and, as the ceiling of what words do, the base pipeline told the digit ("a handwritten digit three").

Writes ``gallery/control/ip_adapter/``: ``results.json``, ``README.md`` and ``samples_<variant>.png`` (rows:
reference | text alone | image prompt, seed 0's run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from .control_demo import timed_training
from .diffusion_demo import mean_std

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {"plain": "IP-Adapter", "plus": "IP-Adapter-plus"}
CONFIGS = {"plain": "ip_adapter_tiny_sd.yaml", "plus": "ip_adapter_plus_tiny_sd.yaml"}
GENERIC = "a handwritten digit"
HELD_OUT_DIGIT = 7
STEPS, GUIDANCE, SHOWN = 20, 3.0, 10


def train(variant: str, seed: int, steps: int, work: Path, threads: int) -> tuple[Path, float]:
    """One training run (reused when it finished before with the same steps); its folder and minutes."""
    run_dir = work / f"{variant}-seed{seed}-steps{steps}"
    if not (run_dir / "minutes.txt").is_file():
        config = ROOT / "configs" / "control" / CONFIGS[variant]
        timed_training(config, [f"optim.steps={steps}"], run_dir, seed, threads)
    return run_dir, float((run_dir / "minutes.txt").read_text())


def references(per_digit: int) -> list[tuple[int, np.ndarray]]:
    """(digit, uint8 image) of the first ``per_digit`` test images of every digit, the held-out 7 included."""
    from visionpeft.demo.captioned_mix import SUBJECTS, captioned_mix

    data = captioned_mix("test", exclude=())
    chosen = []
    for digit in range(10):
        images = [im for im, t in zip(data.images, data.targets) if SUBJECTS[t] == f"digit {digit}"]
        chosen += [(digit, image) for image in images[:per_digit]]
    return chosen


def draw(pipe, prompt: str, seeds: list[int], embeds=None) -> np.ndarray:
    """uint8 images of ``prompt``, one per sample seed (one batch), with ``embeds`` (one reference's image prompt,
    batch 1) as image prompt if given."""
    import contextlib

    import torch

    import visionpeft as vp

    context = contextlib.nullcontext()
    if embeds is not None:

        def repeat(e):
            return e.repeat(len(seeds), *[1] * (e.dim() - 1))

        batched = tuple(map(repeat, embeds)) if isinstance(embeds, tuple) else repeat(embeds)
        context = vp.conditioning(pipe, ip_image_embeds=batched)
    with context:
        images = pipe(
            [prompt] * len(seeds),
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            output_type="np",
            height=32,
            width=32,
        ).images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def rates(judge, digits: list[int], drawn: list[np.ndarray]) -> dict[str, float]:
    """The judge's rate of each reference's digit, over the held-in digits and over the held-out 7."""
    hits = {"held_in": [], "held_out": []}
    for digit, images in zip(digits, drawn):
        part = "held_out" if digit == HELD_OUT_DIGIT else "held_in"
        hits[part] += [p == f"digit {digit}" for p in judge.predict(images)]
    return {part: float(np.mean(values)) for part, values in hits.items()}


def image_prompts(pipe, encoder, reference_images: list[np.ndarray], plus: bool) -> list:
    from PIL import Image

    from visionpeft.trainers.ip_adapter import image_processor, image_prompt

    processor = image_processor(pipe, encoder)
    prompts = []
    for image in reference_images:
        pixels = processor(images=Image.fromarray(image), return_tensors="pt").pixel_values
        prompts.append(image_prompt(encoder, pixels, plus))
    return prompts


def write_readme(results: dict, out: Path) -> None:
    base = results["text_alone"]
    named = results["digit_named"]
    lines = [
        "# IP-Adapter on the embedded tiny pipeline",
        "",
        f"Made by `{results['command']}` on a 2-core CPU shared with other jobs (minutes: wall time under that load). "
        "Training: the captioned mix (digit 7 and the brick texture "
        f"held out), each image its own image prompt, {results['steps']:,} steps, batch 16, lr 1e-3, text dropped at "
        f"0.5 (`configs/control/ip_adapter{{,_plus}}_tiny_sd.yaml`: why in the header), training seeds "
        f"{', '.join(map(str, results['seeds']))}. Image encoder: the tiny CLIP's image tower. Score: "
        f"{results['references_per_digit']} held-out test images of each digit as references, {results['samples']} "
        f'samples each (the same sample seeds for every row), prompt "{GENERIC}", {STEPS} DDIM steps, '
        f"guidance {GUIDANCE}; the judge's rate (%) of the reference's digit, mean ± std over training seeds.",
        "",
        "| sampling | trainable params | reference's digit, held-in digits | reference's digit, held-out 7 | minutes |",
        "|---|---:|---:|---:|---:|",
        f'| text alone ("{GENERIC}", base pipeline) | 0 | {100 * base["held_in"]:.0f} | '
        f"{100 * base['held_out']:.0f} | |",
    ]
    for variant, row in results["variants"].items():
        lines.append(
            f"| image prompt, {VARIANTS[variant]} | {row['trainable']:,} | "
            f"{mean_std([r['held_in'] for r in row['rates']])} | {mean_std([r['held_out'] for r in row['rates']])} | "
            f"{statistics.mean(row['minutes']):.1f} |"
        )
    lines += [
        f'| the digit named in text ("a handwritten digit three", base pipeline) | 0 | {100 * named["held_in"]:.0f} | '
        f"{100 * named['held_out']:.0f} | |",
        "",
        "The last row is what words alone reach: the base pipeline draws the digits it was pretrained on when told "
        f'which, and never learned the 7 ("a handwritten digit seven": {100 * named["held_out"]:.0f}%). The held-out '
        "7 asks more of an image prompt than the held-in digits: the adapter never trained on a 7 and the frozen U-Net "
        "never learned to draw one.",
        "",
    ]
    for variant in results["variants"]:
        lines += [
            f"{VARIANTS[variant]} (training seed {results['seeds'][0]}), one held-out test image of each digit; rows: "
            "the reference | text alone | with the reference as image prompt (same sample seed)",
            "",
            f"![{variant}](samples_{variant}.png)",
            "",
        ]
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--references", type=int, default=3, help="test images of each digit used as references")
    parser.add_argument("--samples", type=int, default=4, help="samples per reference")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of training and scoring")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ip_adapter_demo")
    parser.add_argument("--out", type=Path, default=ROOT / "gallery" / "control" / "ip_adapter")
    parser.add_argument("--from-json", type=Path, help="rewrite README.md from a results.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        write_readme(json.loads(args.from_json.read_text()), args.out)
        return 0
    import torch

    import visionpeft as vp
    from visionpeft.backbones.diffusers_loading import load_image_encoder
    from visionpeft.demo.captioned_mix import digit_prompt
    from visionpeft.demo.judge import Judge

    from .diffusion_demo import grid, load_pipe

    torch.set_num_threads(args.threads)
    judge = Judge.load()
    pipe = load_pipe(ROOT / "checkpoints" / "tiny_sd")
    encoder = load_image_encoder(str(ROOT / "checkpoints" / "tiny_sd_image_encoder"), None)
    chosen = references(args.references)
    digits = [d for d, _ in chosen]
    seeds = [list(range(i * args.samples, (i + 1) * args.samples)) for i in range(len(chosen))]
    generic = [draw(pipe, GENERIC, s) for s in seeds]
    named = [draw(pipe, digit_prompt(d), s) for d, s in zip(digits, seeds)]
    results = {
        "command": " ".join(["python tools/benchmark.py ip-adapter-demo", *argv]),
        "steps": args.steps,
        "seeds": args.seeds,
        "references_per_digit": args.references,
        "samples": args.samples,
        "text_alone": rates(judge, digits, generic),
        "digit_named": rates(judge, digits, named),
        "variants": {},
    }
    shown = [args.references * d for d in range(10)]  # the first reference of each digit
    for variant in args.variants:
        row = {"rates": [], "minutes": []}
        prompts = image_prompts(pipe, encoder, [image for _, image in chosen], variant == "plus")  # frozen encoder
        for seed in args.seeds:
            run_dir, minutes = train(variant, seed, args.steps, args.work, args.threads)
            row["trainable"] = vp.count_parameters(vp.load_adapter(pipe, run_dir / "last"))["trainable"]
            drawn = [draw(pipe, GENERIC, s, embeds) for s, embeds in zip(seeds, prompts)]
            vp.detach(pipe)
            row["rates"].append(rates(judge, digits, drawn))
            row["minutes"].append(minutes)
            print(f"{variant} seed {seed}: {row['rates'][-1]}")
            if seed == args.seeds[0]:
                rows = [[chosen[i][1] for i in shown], [generic[i][0] for i in shown], [drawn[i][0] for i in shown]]
                grid(rows, args.out / f"samples_{variant}.png", cols=len(shown))
        results["variants"][variant] = row
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_readme(results, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
