"""Export of the pretrained tiny text-to-image pipeline: the ``save_pretrained`` folder plus its model card.

The run's ``RUN/pipeline`` (fp32) is shipped with the U-Net and the VAE in fp16 (diffusers loads them back as fp32)
and the text encoder in fp32 (transformers would keep fp16 weights in fp16, which CPU training and textual inversion
should not get); the card is written from what the run recorded: data, steps, losses, wall time, sample grid.
"""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import torch

from ..io import shown_path
from .captioned_mix import SUBJECTS
from .tiny_sd_parts import TRAINING_RECORD, pretraining_images

CARD_LIMITS = """\
What it can draw: the families it saw, at 32 px - handwritten digits (blurry, as the 8 x 8 originals upsampled,
but each of the nine clearly), grey textures, discs in some of the prompted colourings, faces as face-like blobs,
photo crops as colour layouts (coins, the rocket and the clock come out best), all with washed-out colours from
its own VAE decoder: `checkpoints/tiny_sd_vae_ft` (the decoder fine-tuned alone) draws the same latents saturated.
What it cannot draw: anything outside the 22 pretraining subjects - the held-out digit 7 and brick texture
included (that is the point: personalization has to teach them), legible text, fine detail, compositions of
several subjects, resolutions other than 32 px (the U-Net runs at other sizes, without having learned them)."""


def _losses(run_dir: Path) -> tuple[float | None, float | None, int]:
    """(first, last) logged training loss (mean of the first / last five records) and the last step."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    if not losses:
        return None, None, 0
    values = [v for _, v in losses]
    return sum(values[:5]) / len(values[:5]), sum(values[-5:]) / len(values[-5:]), losses[-1][0]


def training_record(config, run_dir: Path, command: str) -> dict:
    """The exported folder's ``training.json``: the VAE stage, every U-Net stage (the earlier ones of the pipeline
    a ``model.init_from`` run continued, then this run's), the held-out subjects and the minutes of all of them."""
    from .pretrain_sd import EARLIER_RECORD

    earlier = json.loads((run_dir / EARLIER_RECORD).read_text()) if (run_dir / EARLIER_RECORD).is_file() else None
    if earlier:
        vae = earlier["vae"]
    else:  # the settings with the numbers, so that a continued run's card can state them
        vae = {
            "batch_size": config.vae.batch_size,
            "lr": config.vae.lr,
            "kl_weight": config.vae.kl_weight,
            **json.loads((run_dir / "vae" / "training.json").read_text()),
        }
    wall = json.loads((run_dir / "wall_minutes.json").read_text())
    first, last, steps = _losses(run_dir)
    o = config.optim
    stage = {
        "command": command,
        "init_from": config.model.init_from,
        "steps": steps,
        "batch_size": config.data.batch_size,
        "lr": o.lr,
        "schedule": o.schedule,
        "warmup_steps": o.warmup_steps,
        "weight_decay": o.weight_decay,
        "clip_grad": o.clip_grad,
        "snr_gamma": o.snr_gamma,
        "caption_dropout": config.data.caption_dropout,
        "ema_decay": config.train.ema_decay,
        "train_text_encoder": config.model.train_text_encoder,
        "first_loss": first,
        "last_loss": last,
        "threads": wall.get("threads"),
        "minutes": wall["minutes"] - (vae["minutes"] if wall.get("includes_vae") else 0.0),
    }
    stages = (earlier["stages"] if earlier else []) + [stage]
    return {
        "vae": vae,
        "stages": stages,
        "held_out": sorted(config.data.exclude),
        "minutes": vae["minutes"] + sum(s["minutes"] for s in stages),
    }


def _stage_lines(stages: list[dict]) -> str:
    """One card bullet per U-Net stage."""
    lines = []
    for i, s in enumerate(stages, 1):
        towers = "U-Net + text encoder" if s["train_text_encoder"] else "U-Net (text encoder frozen)"
        start = f"continuing `{shown_path(s['init_from'])}`, " if s.get("init_from") else ""
        lines.append(
            f"- {towers}, stage {i} ({start}`{s['command']}`): {s['steps']} steps, batch {s['batch_size']}, AdamW lr "
            f"{s['lr']} ({s['schedule']}, {s['warmup_steps']} warmup), weight decay {s['weight_decay']}, grad clip "
            f"{s['clip_grad']}, min-SNR gamma {s['snr_gamma']}, caption dropout {s['caption_dropout']} "
            f"(classifier-free guidance), EMA {s['ema_decay']} (shipped); loss (min-SNR weighted epsilon MSE) "
            f"{s['first_loss']:.4f} over the first logged steps -> {s['last_loss']:.4f} over the last; "
            f"{s['minutes']:.1f} minutes on {s.get('threads') or '?'} CPU thread(s)."
        )
    return "\n".join(lines)


def _architecture(pipeline) -> dict:
    """The widths the card states, read from the saved modules' configs (not from the run's config)."""
    vae, unet, text = pipeline.vae.config, pipeline.unet.config, pipeline.text_encoder.config
    factor = 2 ** (len(vae.block_out_channels) - 1)
    return {
        "vae_channels": list(vae.block_out_channels),
        "latent_channels": vae.latent_channels,
        "vae_scale_factor": factor,
        "image_size": unet.sample_size * factor,
        "sample_size": unet.sample_size,
        "unet_channels": list(unet.block_out_channels),
        "layers_per_block": unet.layers_per_block,
        "text_width": text.hidden_size,
        "text_layers": text.num_hidden_layers,
        "text_heads": text.num_attention_heads,
        "max_tokens": text.max_position_embeddings,
    }


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ship_run_pipeline(
    pipeline_class, half: tuple[str, ...], record_of, config, run_dir: Path, target: Path, command: str
):
    """What every embedded pipeline's export does first: ``RUN/pipeline`` loaded as ``pipeline_class`` and saved
    into a fresh ``target`` with the ``half`` parts in fp16 (the rest fp32), the run's last validation grid as
    ``samples.png`` and ``record_of(config, run_dir, command)`` as ``training.json``. The config is the run's own
    (``RUN/config.yaml``) when it has one, whatever ``config`` says now. Returns (config, pipeline, record, the
    captioned images it trained on) for the card."""
    from omegaconf import OmegaConf

    from ..backbones.diffusers_loading import dtype_keyword

    if (run_dir / "config.yaml").is_file():
        config = OmegaConf.load(run_dir / "config.yaml")
    pipeline = pipeline_class.from_pretrained(run_dir / "pipeline", **dtype_keyword(torch.float32))
    if target.exists():
        shutil.rmtree(target)
    for part in half:
        getattr(pipeline, part).to(torch.float16)
    pipeline.save_pretrained(target)
    grids = sorted((run_dir / "validation").glob("*.png"))
    if grids:
        shutil.copyfile(grids[-1], target / "samples.png")
    record = record_of(config, run_dir, command)
    (target / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    images = pretraining_images(config)
    return config, pipeline, record, images


def export_pipeline(config, run_dir: Path, target: Path, command: str) -> Path:
    """Writes ``target``: the pipeline (U-Net / VAE fp16, text encoder fp32), a sample grid and ``README.md``;
    the card describes the run as it was configured (``RUN/config.yaml``), whatever ``config`` says now."""
    from diffusers import StableDiffusionPipeline

    config, pipeline, record, images = ship_run_pipeline(
        StableDiffusionPipeline, ("unet", "vae"), training_record, config, run_dir, target, command
    )
    vae = record["vae"]
    families = collections.Counter(SUBJECTS[label].split(" ")[0] for label in images.targets)
    size_mb = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 2**20
    a = _architecture(pipeline)
    text = (
        "trained jointly with the U-Net"
        if all(s["train_text_encoder"] for s in record["stages"])
        else "frozen at its random initialisation in at least one stage"
    )
    latent = a["sample_size"]
    guidance = config.train.guidance_scale
    card = f"""# tiny_sd

A tiny text-to-image latent diffusion model in diffusers' `StableDiffusionPipeline` layout, pretrained from scratch
by visionpeft on this machine's CPU on {len(images):,} captioned 32 px images whose pixels ship inside scikit-learn and
scikit-image - so that personalization (and later control) can be shown to *learn*, offline, with no hub model.

```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("checkpoints/tiny_sd", torch_dtype=torch.float32)
generator = torch.Generator().manual_seed(0)
image = pipe("a handwritten digit three", num_inference_steps=20, guidance_scale={guidance}, generator=generator)
image = image.images[0]  # 32 x 32
```

![samples](samples.png)

Rows of `samples.png`: {", ".join(f'"{p}"' for p in _validation_prompts())}.

## Architecture ({size_mb:.1f} MB on disk)
- `AutoencoderKL`: block widths {a["vae_channels"]}, {a["latent_channels"]} latent channels: {a["image_size"]} px ->
  {latent} x {latent} x {a["latent_channels"]} latents (vae_scale_factor {a["vae_scale_factor"]});
  `scaling_factor` {vae["scaling_factor"]:.4f} = 1 / the measured latent std;
  {_parameters(pipeline.vae):,} parameters (fp16 file).
- `UNet2DConditionModel`: block widths {a["unet_channels"]} (cross-attention in all but the first),
  {a["layers_per_block"]} resnet per block, `sample_size` {latent} (the pipeline draws 32 px by default),
  `cross_attention_dim` {a["text_width"]}; {_parameters(pipeline.unet):,} parameters (fp16 file).
- `CLIPTextModel`: width {a["text_width"]}, {a["text_layers"]} layers, {a["text_heads"]} heads,
  {a["max_tokens"]} positions; {_parameters(pipeline.text_encoder):,} parameters, of which the 49,408-token embedding
  table is {49408 * a["text_width"]:,} (fp32 file: transformers keeps a checkpoint's dtype, and textual inversion
  trains it).
- `CLIPTokenizer`: the CLIP BPE vocabulary shipped in open_clip (`visionpeft/data/clip_vocab.py`), model_max_length
  {a["max_tokens"]}.
- Scheduler: DDPM training (1000 steps, scaled-linear betas 0.00085-0.012 as Stable Diffusion, epsilon prediction);
  the folder ships a `DDIMScheduler` over the same schedule (20 steps are enough).
- Text encoder: {text}. Why: its {a["text_layers"]} small layers cost little next to the U-Net, and a trained
  encoder gives each caption word (digit names, colours, nouns) an embedding the U-Net's cross-attention can read
  apart; words never seen in pretraining (`seven`, `brick`) keep their random embeddings, which is what textual
  inversion starts from.
  Not measured against a frozen random encoder (no CPU time for a second pretraining run).

## Data (`visionpeft/demo/captioned_mix.py`, split `all`)
| family | images | captions |
|---|---:|---|
| digit | {families["digit"]} | "a handwritten digit three" (scikit-learn digits, 8 x 8 upsampled) |
| texture | {families["texture"]} | "a photo of gravel", grass, moon surface, stars, stained tissue (skimage crops) |
| face | {families["face"]} | "a photo of a face" (scikit-image LFW subset, flipped copies) |
| photo | {families["photo"]} | "a photo of a cat", coffee, astronaut, rocket, coins, clock (scikit-image crops) |
| circle | {families["circle"]} | "red circle with blue background" (fill50k-style, 8 colours) |

**Held out** (never seen by the VAE, U-Net or text encoder): {", ".join(config.data.exclude)}.
`tests/test_tiny_sd.py` checks the data builder leaves them out.

## Training
- VAE: {vae["steps"]} steps, batch {vae["batch_size"]}, AdamW lr {vae["lr"]} (cosine), pixel MSE +
  {vae["kl_weight"]} x KL; final train MSE {vae["final_train_mse"]:.4f}, reconstruction MSE (images in [-1, 1])
  {vae["reconstruction_mse"]:.4f}; {vae["minutes"]:.1f} minutes.
{_stage_lines(record["stages"])}
- **Wall time: {record["minutes"]:.1f} minutes** all in (every stage, validation grids, saves) on a 2-core CPU shared
  with other jobs.
- `--resume` continues an interrupted run; `--export-only` rewrites this folder; `training.json` holds this record.

## Limits
{CARD_LIMITS}

Measured quality (the judge's recognition of base samples, KID, personalization before / after) is in
`gallery/diffusion/README.md`, made by `python tools/benchmark.py diffusion-demo`.
"""
    (target / "README.md").write_text(card)
    return target


def _validation_prompts() -> tuple[str, ...]:
    from .pretrain_sd import VALIDATION_PROMPTS

    return VALIDATION_PROMPTS
