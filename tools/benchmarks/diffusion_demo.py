"""The diffusion demo: what the embedded tiny pipeline draws, and whether personalization visibly learns.

    python tools/benchmark.py diffusion-demo [--seeds 0 1 2] [--samples 20] [--methods ...] [--train-steps N]
    python tools/benchmark.py diffusion-demo --add --methods dreambooth_loha dreambooth_lokr dreambooth_oft
    python tools/benchmark.py diffusion-demo --from-json gallery/diffusion/results.json   # rewrite README only
    python tools/benchmark.py diffusion-demo --pipeline checkpoints/tiny_flux   # -> gallery/diffusion/tiny_flux/

Writes ``gallery/diffusion/``:

* base sample grids per prompt family (``base_<family>.png``) from ``checkpoints/tiny_sd``, the judge's
  recognition rate per prompt (for each pretrained digit k: the share of "a handwritten digit k" samples the judge
  calls digit k) and KID on the judge's features between generated and real images;
* personalization of the held-out digit 7 from 5 real images with textual inversion, DreamBooth-LoRA and DiffFit
  (``configs/personalize/*_tiny_sd.yaml``, the project's personalization trainer), images before / after with the
  same sampling seeds (``personalize_<method>.png``), the judge's rate of seeing a 7 before vs after (mean +- std
  over training seeds), trainable parameters and minutes;
* ``results.json`` (the command and every number) and ``README.md`` (tables and pictures).

``--pipeline checkpoints/tiny_flux`` (a ``FluxPipeline`` folder) makes the same gallery of the tiny Flux-layout
pipeline in ``gallery/diffusion/tiny_flux/`` (runs in ``runs/diffusion_demo/tiny_flux``): sampling at 32 px with T5 at
its trained length and true classifier-free guidance (``true_cfg_scale`` 3 against ``""``), personalization with
``configs/personalize/<method>_tiny_flux.yaml``, DreamBooth-LoRA and DiffFit by default (textual inversion is not
offered on Flux: a new token would reach CLIP and not T5).

``--add`` trains only ``--methods`` and adds their rows to the gallery's ``results.json`` (base samples and the other
rows kept, the command recorded beside the first one): how the DreamBooth rows of LoHa, LoKr and OFT
(``configs/personalize/dreambooth_{loha,lokr,oft}_tiny_sd.yaml``, the DreamBooth-LoRA recipe with the LyCORIS method in
place of LoRA) joined the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
METHODS = {
    "textual_inversion": "textual inversion",
    "dreambooth_lora": "DreamBooth-LoRA",
    "difffit": "DiffFit",
    "dreambooth_loha": "DreamBooth-LoHa",
    "dreambooth_lokr": "DreamBooth-LoKr",
    "dreambooth_oft": "DreamBooth-OFT",
}
#: what a plain run trains; the LyCORIS rows are added to a finished gallery with ``--add`` (see the docstring)
DEFAULT_METHODS = ["textual_inversion", "dreambooth_lora", "difffit"]
#: the methods a Flux-layout gallery trains by default
FLUX_METHODS = ["dreambooth_lora", "difffit"]
#: pipeline family -> the suffix of its personalization configs (``configs/personalize/<method>_<suffix>.yaml``)
CONFIG_SUFFIX = {"sd": "tiny_sd", "flux": "tiny_flux"}
SUBJECT = "digit 7"
GUIDANCE = 3.0


def family_prompts() -> dict[str, list[tuple[str, str]]]:
    """family -> [(prompt, subject the judge should see)] (held-out subjects included: they show what is missing)."""
    from visionpeft.demo.captioned_mix import PHOTOS, TEXTURES, digit_prompt

    return {
        "digits": [(digit_prompt(d), f"digit {d}") for d in range(10)],
        "textures": [(f"a photo of {t}", f"texture {t}") for t in TEXTURES],
        "photos": [("a photo of a face", "face")] + [(f"a photo of {p}", f"photo {p}") for p in PHOTOS],
        "circles": [
            (f"{a} circle with {b} background", "circle")
            for a, b in [
                ("red", "blue"),
                ("yellow", "black"),
                ("white", "green"),
                ("blue", "orange"),
                ("purple", "white"),
                ("green", "red"),
            ]
        ],
    }


def family_of(pipeline: Path) -> str:
    """``flux`` for a ``FluxPipeline`` folder, else ``sd``."""
    index = json.loads((Path(pipeline) / "model_index.json").read_text())
    return "flux" if index.get("_class_name") == "FluxPipeline" else "sd"


def guidance_options(pipe, count: int) -> dict:
    """The guidance keywords of a call: classifier-free guidance ``GUIDANCE``; a Flux-layout pipeline (no guidance
    embedding) gets it as true CFG against ``""``, at 32 px and T5's trained length (its tokenizer's
    ``model_max_length``)."""
    if getattr(pipe, "transformer", None) is None:
        return {"guidance_scale": GUIDANCE}
    from visionpeft.demo.tiny_flux_parts import sampling_options

    return sampling_options(pipe.tokenizer_2.model_max_length, GUIDANCE, prompts=count)


def sample(pipe, prompt: str, count: int, seed: int, steps: int):
    """``count`` uint8 images (N, 32, 32, 3) of one prompt, reproducible by ``seed``."""
    import torch

    images = pipe(
        [prompt] * count,
        num_inference_steps=steps,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        **guidance_options(pipe, count),
    ).images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def grid(rows: list, path: Path, scale: int = 3, cols: int = 8) -> None:
    """Saves rows of uint8 images as one picture (each image ``scale`` x upsampled, nearest; white lines between)."""
    from PIL import Image

    from visionpeft.data.image_grid import image_grid

    cells = [[Image.fromarray(image) for image in row[:cols]] for row in rows]
    image_grid(cells, scale=scale, gap=2 * scale, margin=scale).save(path)


def base_samples(pipe, judge, out: Path, count: int, steps: int) -> dict:
    """Grids per family, the judge's recognition rate per prompt, KID against real test images."""
    from visionpeft.demo.captioned_mix import HELD_OUT, SUBJECTS, captioned_mix
    from visionpeft.demo.judge import kid

    rates, generated = {}, {}
    start = time.time()
    for family, prompts in family_prompts().items():
        rows = []
        for i, (prompt, subject) in enumerate(prompts):
            n = count if family == "digits" else 8
            images = sample(pipe, prompt, n, seed=1000 + i, steps=steps)
            named = judge.predict(images)
            rates[prompt] = {
                "subject": subject,
                "rate": float(np.mean([p == subject for p in named])),
                "n": n,
                "held_out": subject in HELD_OUT,
            }
            generated.setdefault(family, []).append(images)
            rows.append(images)
        grid(rows, out / f"base_{family}.png")
    seconds = time.time() - start
    real = captioned_mix("test", exclude=())
    seen = np.array([SUBJECTS[t] not in HELD_OUT for t in real.targets])
    digit = np.array([SUBJECTS[t].startswith("digit") for t in real.targets])
    gen_digits = np.concatenate(
        [g for g, (_, s) in zip(generated["digits"], family_prompts()["digits"]) if s not in HELD_OUT]
    )
    gen_all = np.concatenate([gen_digits] + [np.concatenate(v) for k, v in generated.items() if k != "digits"])
    train = captioned_mix("train", exclude=())
    train_digits = train.images[
        np.array([SUBJECTS[t].startswith("digit") and SUBJECTS[t] not in HELD_OUT for t in train.targets])
    ]
    kids = {
        "digits: generated vs real test": kid(judge, real.images[seen & digit], gen_digits),
        "digits: real train vs real test (floor)": kid(judge, real.images[seen & digit], train_digits),
        "all families: generated vs real test": kid(judge, real.images[seen], gen_all),
    }
    return {"rates": rates, "kid": kids, "sampling_seconds": seconds}


def subject_images(folder: Path, count: int = 5) -> list:
    """The first ``count`` training images of the held-out subject, written as PNGs into ``folder``."""
    from PIL import Image

    from visionpeft.demo.captioned_mix import SUBJECTS, captioned_mix

    data = captioned_mix("train", exclude=())
    chosen = [im for im, t in zip(data.images, data.targets) if SUBJECTS[t] == SUBJECT][:count]
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(chosen):
        Image.fromarray(image).save(folder / f"{i}.png")
    return chosen


def launch(method: str, seed: int, images: Path, runs: Path, pipeline: Path, train_steps: int | None):
    """Starts one personalization run, ``python tools/train.py configs/personalize/<method>_tiny_sd.yaml ...``
    (``_tiny_flux.yaml`` for a Flux pipeline); a run that finished before with the same arguments
    (``<runs>/<name>.args.json``) is reused, not trained again, so an interrupted demo goes on where it stopped."""
    config_path = ROOT / "configs" / "personalize" / f"{method}_{CONFIG_SUFFIX[family_of(pipeline)]}.yaml"
    name = f"{method}-seed{seed}"
    overrides = [
        f"data.images={images}",
        f"train.seed={seed}",
        f"train.run_name={name}",
        f"train.output_dir={runs}",
        f"model.name={pipeline}",
    ]
    if train_steps:
        overrides += [f"optim.steps={train_steps}", f"train.eval_every={train_steps}"]
    job = {"run_dir": runs / name, "start": time.time(), "method": method}
    request = runs / f"{name}.args.json"
    asked = json.dumps({"config": str(config_path), "overrides": overrides})
    if (runs / name / "README.md").is_file() and request.is_file() and request.read_text() == asked:
        return {**job, "process": None, "log": None}  # finished before with the same arguments: reused
    shutil.rmtree(runs / name, ignore_errors=True)
    runs.mkdir(parents=True, exist_ok=True)
    request.write_text(asked)
    log = open(runs / f"{name}.log", "w")  # noqa: SIM115  (closed by finish)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "tools" / "train.py"), str(config_path), *overrides]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return {**job, "process": process, "log": log}


def logged_minutes(log: Path) -> float:
    """The minutes a finished run's log reports (``run: DIR (300 steps, 12.2 min; ...``)."""
    found = re.search(r"\(\d+ steps, ([\d.]+) min;", log.read_text())
    return float(found.group(1)) if found else float("nan")


def finish(job: dict) -> dict:
    """Waits for a launched run; returns its folder, prompt, trained parameters, steps and minutes."""
    from safetensors import safe_open

    from visionpeft.checkpoint.folder import WEIGHTS_NAME
    from visionpeft.config import load_config

    if job["process"] is None:  # reused: its own training minutes, from its log's last line
        code, minutes = 0, logged_minutes(job["run_dir"].parent / f"{job['run_dir'].name}.log")
    else:
        code = job["process"].wait()
        job["log"].close()
        minutes = (time.time() - job["start"]) / 60
    if code != 0:
        tail = (job["run_dir"].parent / f"{job['run_dir'].name}.log").read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"{job['method']} failed ({code}): {' | '.join(tail)}")
    config = load_config(job["run_dir"] / "config.yaml")
    with safe_open(str(job["run_dir"] / "adapter" / WEIGHTS_NAME), "pt") as f:
        trainable = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    return {
        "run_dir": str(job["run_dir"]),
        "prompt": config.data.prompt.format(config.token),
        "trainable": trainable,
        "steps": config.optim.steps,
        "minutes": minutes,
    }


def load_pipe(path: Path):
    """The pipeline folder in fp32: a ``StableDiffusionPipeline``, or a ``FluxPipeline`` (:func:`family_of`)."""
    import torch
    from diffusers import FluxPipeline, StableDiffusionPipeline

    from visionpeft.backbones.diffusers_loading import dtype_keyword

    kind = FluxPipeline if family_of(path) == "flux" else StableDiffusionPipeline
    pipe = kind.from_pretrained(path, **dtype_keyword(torch.float32))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def personalization(
    judge,
    out: Path,
    runs: Path,
    pipeline: Path,
    methods: list[str],
    seeds: list[int],
    count: int,
    steps: int,
    train_steps: int | None,
) -> dict:
    """Every (method, seed): train (the methods of a seed run in parallel processes), then sample before / after
    with the same sampling seeds; the judge counts 7s."""
    from visionpeft.cli.generate import apply_adapter

    base = load_pipe(pipeline)
    chosen = subject_images(out / "subject")
    grid([chosen], out / "subject.png", scale=4, cols=len(chosen))
    results = {}
    for seed in seeds:
        jobs = [launch(method, seed, out / "subject", runs, pipeline, train_steps) for method in methods]
        for method, job in zip(methods, jobs):
            info = finish(job)
            before = sample(base, info["prompt"], count, seed=seed, steps=steps)
            tuned = load_pipe(pipeline)
            apply_adapter(tuned, Path(info["run_dir"]) / "adapter")
            after = sample(tuned, info["prompt"], count, seed=seed, steps=steps)
            info["before"], info["after"] = subject_rate(judge, before), subject_rate(judge, after)
            print(
                f"{method} seed {seed}: judge sees a 7 in {100 * info['before']:.0f}% before, "
                f"{100 * info['after']:.0f}% after ({info['minutes']:.1f} min)",
                flush=True,
            )
            results.setdefault(method, []).append(info)
            if seed == seeds[0]:
                grid([before, after], out / f"personalize_{method}.png")
    return results


def subject_rate(judge, images) -> float:
    """The share of ``images`` the judge calls the held-out subject (a 7)."""
    return float(np.mean([p == SUBJECT for p in judge.predict(images)]))


def mean_std(values: list[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.mean(values):.0f} ± {statistics.stdev(values):.0f}"


def write_readme(results: dict, out: Path) -> None:
    """``README.md`` of the gallery: the tables and pictures of ``results``."""
    base, pers = results["base"], results.get("personalization", {})
    digits = [(p, r) for p, r in base["rates"].items() if r["subject"].startswith("digit")]
    pretrained = [r["rate"] for _, r in digits if not r["held_out"]]
    flux = results.get("family") == "flux"
    lines = [
        "# Diffusion, offline: the embedded tiny " + ("Flux-layout pipeline" if flux else "pipeline"),
        "",
        f"Made by `{results['command']}`"
        + "".join(f", then `{added}`" for added in results.get("added_by", []))
        + f" on a 2-core CPU shared with other jobs ({results['minutes']:.1f} minutes in all).",
        *(_flux_header(results) if flux else _sd_header(results)),
        "",
        "## Base samples",
        "",
        "Digits (rows 0-9; row 7 is the held-out digit, never seen): ![digits](base_digits.png)",
        "",
        "Textures (gravel ... ; brick is held out): ![textures](base_textures.png)",
        "",
        "Face and photos: ![photos](base_photos.png)  Circles: ![circles](base_circles.png)",
        "",
        f"Judge recognition of the prompted subject ({digits[0][1]['n']} samples per digit prompt, 8 otherwise);"
        f" pretrained digits: mean **{100 * statistics.mean(pretrained):.0f}%** (target >= 70%, chance ~4% over 24"
        " subjects, ~10% over digits).",
        "",
        "| prompt | judge sees the subject (%) |",
        "|---|---:|",
    ]
    for prompt, r in base["rates"].items():
        note = " (held out)" if r["held_out"] else ""
        lines.append(f"| {prompt}{note} | {100 * r['rate']:.0f} |")
    lines += [
        "",
        "KID on the judge's pre-logit features (torchmetrics `KernelInceptionDistance` with the judge as its"
        " feature module, cubic polynomial kernel; lower is closer; the judge's 192-d features are unnormalised,"
        " so the scale is its own - compare rows, not other papers' KID):",
        "",
        "| sets | KID (mean ± std over subsets) |",
        "|---|---:|",
    ]
    for name, (m, s) in base["kid"].items():
        lines.append(f"| {name} | {m:.3f} ± {s:.3f} |")
    if pers:
        suffix, subject = (
            ("tiny_flux", "gallery/diffusion/tiny_flux/subject") if flux else ("tiny_sd", "gallery/diffusion/subject")
        )
        lines += [
            "",
            "## Personalization of a held-out subject (digit 7, 5 real images)",
            "",
            "The 5 training images: ![subject](subject.png)",
            "",
            f"Each method trains with `python tools/train.py configs/personalize/<method>_{suffix}.yaml "
            f"data.images={subject}`; the judge counts how many samples of the method's prompt"
            f" it calls a 7, before (the base pipeline, same prompt, same sampling seeds) and after; mean ±"
            f" std over training seeds {results['seeds']}.",
            "",
            "| method | prompt | trainable params | steps | before (%) | after (%) | minutes per run |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for method, runs in pers.items():
            r0 = runs[0]
            lines.append(
                f"| {METHODS[method]} | `{r0['prompt']}` | {r0['trainable']:,} | {r0['steps']} | "
                f"{mean_std([r['before'] for r in runs])} | {mean_std([r['after'] for r in runs])} | "
                f"{statistics.mean(r['minutes'] for r in runs):.1f} |"
            )
        lines.append("")
        for method in pers:
            lines.append(
                f"{METHODS[method]} (top: before, bottom: after, seed {results['seeds'][0]}): "
                f"![{method}](personalize_{method}.png)"
            )
            lines.append("")
    if results.get("notes"):
        lines += ["## Reading the numbers", "", results["notes"], ""]
    lines += ["## Not measured here", "", results.get("not_done", "")]
    (out / "README.md").write_text("\n".join(lines).rstrip() + "\n")


def _sd_header(results: dict) -> list[str]:
    return [
        "The pipeline is `checkpoints/tiny_sd` (pretrained by `python tools/pretrain.py configs/pretrain/tiny_sd.yaml`"
        " then `configs/pretrain/tiny_sd_continue.yaml`, see its model card); images are judged by"
        " `checkpoints/tiny_sd_judge.safetensors`, a classifier of the 24"
        " subjects trained by the project on real images (`checkpoints/tiny_sd_judge.md`).",
        f"Sampling: DDIM, {results['steps']} steps, guidance {GUIDANCE}, 32 px.",
        "",
        "Embedded pretrained pipelines: the SD 1.x layout (`checkpoints/tiny_sd`, epsilon prediction, this gallery)"
        " and the Flux layout (`checkpoints/tiny_flux`, flow matching, its own gallery: `tiny_flux/README.md`);"
        " `checkpoints/` holds no pretrained SDXL or SD3 pipeline. SDXL's code paths (both text encoders,"
        " the added time ids) are tested on random-weight tiny layouts and train with the denoising loss this"
        " pipeline trains with (`visionpeft.trainers.diffusion.diffusion_loss`), so what this gallery shows about"
        " learning covers them; SD3 trains with the flow-matching loss (`visionpeft.trainers.flow_matching`) that"
        " the Flux gallery shows learn, on its own transformer, tested on random tiny layouts only.",
    ]


def _flux_header(results: dict) -> list[str]:
    return [
        "The pipeline is `checkpoints/tiny_flux`, a `FluxPipeline` (pretrained by `python tools/pretrain.py"
        " configs/pretrain/tiny_flux.yaml` on the captioned mix `checkpoints/tiny_sd` saw, reusing its VAE and"
        " CLIP; see its model card); images are judged by `checkpoints/tiny_sd_judge.safetensors`, the same"
        " classifier of the 24 subjects as the SD gallery (`../README.md`).",
        f"Sampling: FlowMatchEuler (FLUX.1-dev's scheduler config), {results['steps']} steps, true classifier-free"
        f" guidance {GUIDANCE} against the empty prompt (`true_cfg_scale`; the transformer has no guidance"
        " embedding), T5 at its trained 16 tokens, 32 px.",
    ]


def added_to(path: Path, command: str) -> dict | None:
    """The finished gallery's results that ``--add`` extends, with ``command`` recorded; None (and one line) when
    there is none."""
    if not path.is_file():
        print(
            f"error: --add extends a finished gallery; {path} does not exist (run without --add first)", file=sys.stderr
        )
        return None
    results = json.loads(path.read_text())
    results["added_by"] = [*results.get("added_by", []), command]
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/benchmark.py diffusion-demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=20, help="samples per digit prompt and per personalization")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument(
        "--methods", nargs="+", default=None, choices=list(METHODS), help="default: per the pipeline's family"
    )
    parser.add_argument(
        "--add", action="store_true", help="train only --methods and add their rows to the gallery's results.json"
    )
    parser.add_argument("--train-steps", type=int, default=None, help="personalization steps (default: configs')")
    parser.add_argument("--skip-personalization", action="store_true")
    parser.add_argument("--pipeline", type=Path, default=ROOT / "checkpoints" / "tiny_sd")
    parser.add_argument("--out", type=Path, default=None, help="default: gallery/diffusion(/tiny_flux)")
    parser.add_argument("--runs", type=Path, default=None, help="default: runs/diffusion_demo(/tiny_flux)")
    parser.add_argument("--from-json", type=Path, default=None, help="rewrite README.md from a results.json")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        write_readme(results, args.from_json.parent)
        return 0
    if not (args.pipeline / "model_index.json").is_file():
        print(
            f"error: {args.pipeline} is no pipeline folder; make checkpoints/tiny_sd with python tools/pretrain.py "
            "configs/pretrain/tiny_sd.yaml",
            file=sys.stderr,
        )
        return 2
    family = family_of(args.pipeline)
    flux = family == "flux"
    args.methods = args.methods or (FLUX_METHODS if flux else DEFAULT_METHODS)
    args.out = args.out or ROOT / "gallery" / "diffusion" / ("tiny_flux" if flux else "")
    args.runs = args.runs or ROOT / "runs" / "diffusion_demo" / ("tiny_flux" if flux else "")
    if flux and "textual_inversion" in args.methods:
        print("error: textual inversion is not offered on Flux (a new token reaches CLIP, not T5)", file=sys.stderr)
        return 2
    from visionpeft.demo.judge import Judge

    start = time.time()
    command = "python tools/benchmark.py diffusion-demo " + " ".join(argv)
    results = added_to(args.out / "results.json", command) if args.add else None
    if args.add and results is None:
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    judge = Judge.load()
    if results is not None:
        previous_minutes = results["minutes"]
    else:
        base = base_samples(load_pipe(args.pipeline), judge, args.out, args.samples, args.steps)
        results = {
            "command": command,
            "steps": args.steps,
            "seeds": args.seeds,
            "base": base,
            "not_done": "Control on fill50k is its own run: `python tools/benchmark.py control-demo` -> "
            "`gallery/control/` (ControlNet / ControlNet-LoRA; T2I-Adapter's layout does not fit this "
            "U-Net).",
        }
        if flux:
            results["family"] = "flux"
            results["not_done"] = (
                "KID rows compare with the SD gallery's only through the same judge features. Not run on this"
                " pipeline: textual inversion (not offered on Flux), the LyCORIS rows, control and IP-Adapter."
            )
        previous_minutes = 0.0
    if not args.skip_personalization:
        rows = personalization(
            judge,
            args.out,
            args.runs,
            args.pipeline,
            args.methods,
            args.seeds,
            args.samples,
            args.steps,
            args.train_steps,
        )
        results["personalization"] = {**results.get("personalization", {}), **rows}
    results["minutes"] = previous_minutes + (time.time() - start) / 60
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_readme(results, args.out)
    print(f"wrote {args.out / 'README.md'}")
    return 0
