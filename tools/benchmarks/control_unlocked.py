"""The control demo's second ControlNet stage: the trained ControlNet continues with the tiny U-Net's decoder unlocked
(``configs/control/controlnet_unlocked_tiny_sd_fill.yaml``, the official code's ``sd_locked=False``).

The frozen tiny U-Net draws the caption's fill colour in about two thirds of samples whatever the control, which held
the first stage's fill IoU under 0.5; the unlocked decoder learns the palette. What that costs is measured beside it:
the run's U-Net without its ControlNet on the held-out pairs, and the judge's recognition rate of the pretraining
mix's other subjects with tiny_sd's own U-Net and with the unlocked one (the official docs call the option dangerous
on data that is not good enough: it can degrade what the model draws otherwise). ``ship`` writes the run's
``controlnet/`` and ``unet/`` with a model card (how ``checkpoints/tiny_sd_controlnet_unlocked`` was made).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .control_scores import GUIDANCE, STEPS, improved, means, score

#: samples per prompt of the judge's rate on the mix's other subjects
JUDGED = 8


def other_subject_prompts() -> list[tuple[str, str]]:
    """(prompt, subject) of the pretraining mix's subjects other than circles, held-out subjects left out."""
    from visionpeft.demo.captioned_mix import HELD_OUT

    from .diffusion_demo import family_prompts

    return [
        (prompt, subject)
        for family, prompts in family_prompts().items()
        if family != "circles"
        for prompt, subject in prompts
        if subject not in HELD_OUT
    ]


def judge_rate(pipe, judge) -> float:
    """The share of ``JUDGED`` samples per other-subject prompt (seed 1000 + prompt index) the judge calls that
    subject."""
    from .diffusion_demo import sample

    rates = [
        np.mean([named == subject for named in judge.predict(sample(pipe, prompt, JUDGED, 1000 + i, STEPS))])
        for i, (prompt, subject) in enumerate(other_subject_prompts())
    ]
    return float(np.mean(rates))


def decoder_costs(pipe, run_dir: Path, test: Path) -> dict:
    """The run's U-Net without its ControlNet: ``decoder_alone`` (held-out means, no control) and ``judge`` (the
    other-subject rate with tiny_sd's U-Net and with the run's)."""
    from visionpeft.backbones.diffusers_loading import load_unet
    from visionpeft.demo.judge import Judge

    judge, own = Judge.load(), pipe.unet
    before = judge_rate(pipe, judge)
    pipe.unet = load_unet(run_dir / "unet")
    try:
        alone = means(score(pipe, test, None)[0])
        after = judge_rate(pipe, judge)
    finally:
        pipe.unet = own
    judged = {"tiny_sd": before, "unlocked": after, "prompts": len(other_subject_prompts())}
    return {"decoder_alone": alone, "judge": judged}


def paragraph(results: dict) -> list[str]:
    """What the second stage's row adds, and what it costs."""
    row = results["methods"].get("controlnet_unlocked")
    first = results["methods"].get("controlnet")
    if not row or not first:
        return []
    alone, judge = row["decoder_alone"], row["judge"]
    return [
        "",
        f"ControlNet, then U-Net decoder unlocked: the ControlNet above continues {results['steps']:,} more steps with "
        "the tiny U-Net's decoder (up blocks, output norm and conv) trained beside it, the official code's "
        "`sd_locked=False` (`configs/control/controlnet_unlocked_tiny_sd_fill.yaml`, `model.init_control` = the "
        f"first run's `controlnet/`). The trainable count adds the decoder's {row['trainable'] - first['trainable']:,} "
        f"parameters. The disc has the caption's colour in {100 * row['colour']:.0f}% of its samples (ControlNet alone "
        f"{100 * first['colour']:.0f}%), which lifts the fill IoU from {first['fill']:.3f} to {row['fill']:.3f} "
        f"({row['improved']} of {results['test_pairs']} pairs improved). {_curve_sentence(row)}"
        f"{_seeds_sentence(row, results['test_pairs'])} The two trained "
        f"together: without its ControlNet the U-Net scores fill IoU {alone['fill']:.3f}, shape IoU "
        f"{alone['shape']:.3f} and colour right {100 * alone['colour']:.0f}%, below tiny_sd's own "
        f"({results['base']['fill']:.3f}, {results['base']['shape']:.3f}, {100 * results['base']['colour']:.0f}%). "
        "What it costs elsewhere (the official docs call the option dangerous): the judge recognises the pretraining "
        f"mix's other subjects ({judge['prompts']} prompts, {JUDGED} samples each, no control) in "
        f"{100 * judge['tiny_sd']:.0f}% of tiny_sd's samples and {100 * judge['unlocked']:.0f}% with the unlocked "
        "decoder.",
    ]


def seed_summary(scores: dict[str, list], base: dict[str, list], minutes: float) -> dict:
    """One training seed's final held-out fill IoU, colour share and pairs improved over the base pipeline."""
    averages = means(scores)
    return {
        "fill": averages["fill"],
        "colour": averages["colour"],
        "improved": improved(scores, base, "fill"),
        "minutes": minutes,
    }


def _seeds_sentence(row: dict, pairs: int) -> str:
    """The second stage over its training seeds (all from the same first stage)."""
    seeds = row.get("seeds", [])
    if len(seeds) < 2:
        return ""
    fills = [entry["fill"] for entry in seeds]
    each = "; ".join(
        f"seed {e['seed']}: {e['fill']:.3f}, {e['improved']}/{pairs} pairs improved, colour right "
        f"{100 * e['colour']:.0f}%"
        for e in seeds
    )
    return (
        f" Over {len(seeds)} training seeds of this stage from the same ControlNet, fill IoU "
        f"{np.mean(fills):.3f} +- {np.std(fills):.3f} ({each})."
    )


def _curve_sentence(row: dict) -> str:
    """The second stage's fill IoU at each checkpoint (one seed: how much it moves between checkpoints)."""
    points = ", ".join(f"{values['fill']:.3f} at step {step:,}" for step, values in row["curve"])
    return f"Its held-out fill IoU over the steps (one seed): {points}."


CARD = """# tiny_sd_controlnet_unlocked

The control gallery's second ControlNet stage for the embedded tiny pipeline (`checkpoints/tiny_sd`, 32 px): the
ControlNet of `checkpoints/tiny_sd_controlnet` trained {steps:,} more steps on fill50k at 32 px with the tiny U-Net's
decoder unlocked (the official ControlNet code's `sd_locked=False`). Two plain diffusers folders, used together:
`controlnet/` (`ControlNetModel`, {controlnet:,} parameters) and `unet/` (the U-Net with its trained decoder,
{decoder:,} of its parameters trained):

```python
from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel

folder = "checkpoints/tiny_sd_controlnet_unlocked"
pipe = StableDiffusionControlNetPipeline.from_pretrained(
    "checkpoints/tiny_sd",
    unet=UNet2DConditionModel.from_pretrained(f"{{folder}}/unet"),
    controlnet=ControlNetModel.from_pretrained(f"{{folder}}/controlnet"),
    vae=AutoencoderKL.from_pretrained("{vae}"),  # the decoder the figures below were drawn with
)
image = pipe("red circle with blue background", image=outline, height=32, width=32, guidance_scale=3.0).images[0]
```

or `python tools/generate.py --model checkpoints/tiny_sd --control {folder} --control-image outline.png --vae {vae}
--prompt "red circle with blue background" --guidance 3` (the decoder goes into tiny_sd's U-Net while it draws).

- **Training**: `configs/control/controlnet_unlocked_tiny_sd_fill.yaml` from the first stage's `controlnet/`
  (`model.init_control`), {steps:,} steps, batch 16, lr 1e-4 (constant), half the captions empty, seed {seed};
  {minutes:.1f} minutes on a shared 2-core CPU.
- **Held-out score** ({pairs} pairs of another generator seed, {sampling}, decoded with
  `{vae}`): fill IoU {fill:.3f} (base pipeline {base_fill:.3f}; first stage {first_fill:.3f}), {improved}/{pairs} pairs
  improved; shape IoU {shape:.3f}; fill colour right in {colour:.0f}% of samples (base {base_colour:.0f}%).
- **Cost**: the unlocked decoder changes what the pipeline draws without a control too. The judge recognises the
  pretraining mix's other subjects in {judge_after:.0f}% of this U-Net's samples against {judge_before:.0f}% of
  tiny_sd's ({judge_prompts} prompts, {judged} samples each). Use it for circles; for anything else keep tiny_sd's
  U-Net with `checkpoints/tiny_sd_controlnet`.
- **Command**: `{command}`. Pictures and the curve: `gallery/control/`.
"""


def ship(run_dir: Path, row: dict, first: dict, results: dict, folder: Path) -> None:
    """Copies the run's ``controlnet/`` and ``unet/`` folders into ``folder`` and writes its model card."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for part in ("controlnet", "unet"):
        shutil.copytree(run_dir / part, folder / part)
    judge = row["judge"]
    (folder / "README.md").write_text(
        CARD.format(
            steps=results["steps"],
            controlnet=first["trainable"],
            decoder=row["trainable"] - first["trainable"],
            seed=results["seed"],
            minutes=row["minutes"],
            pairs=results["test_pairs"],
            sampling=f"{STEPS} DDIM steps, guidance {GUIDANCE}, sample seed = pair index",
            vae=results["vae"]["folder"] if results.get("vae") else "checkpoints/tiny_sd/vae",
            folder=folder,
            fill=row["fill"],
            base_fill=results["base"]["fill"],
            first_fill=first["fill"],
            improved=row["improved"],
            shape=row["shape"],
            colour=100 * row["colour"],
            base_colour=100 * results["base"]["colour"],
            judge_after=100 * judge["unlocked"],
            judge_before=100 * judge["tiny_sd"],
            judge_prompts=judge["prompts"],
            judged=JUDGED,
            command=results["command"],
        )
    )
    print(f"wrote {folder}")
