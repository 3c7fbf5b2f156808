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

from ..data.captioned_mix import SUBJECTS, captioned_mix

CARD_LIMITS = """\
What it can draw: the families it saw, at 32 px, roughly - handwritten digits (blurry, as the 8 x 8 originals
upsampled; some digits much more reliably than others), grey textures, a disc of roughly the prompted placement with
the background colour more often right than the fill colour, faces as face-like blobs, photo crops as colour
layouts (coins and the clock come out best), all with washed-out colours.
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


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def export_pipeline(config, run_dir: Path, target: Path, command: str) -> Path:
    """Writes ``target``: the pipeline (U-Net / VAE fp16, text encoder fp32), a sample grid and ``README.md``;
    the card describes the run as it was configured (``RUN/config.yaml``), whatever ``config`` says now."""
    from diffusers import StableDiffusionPipeline
    from omegaconf import OmegaConf

    if (run_dir / "config.yaml").is_file():
        config = OmegaConf.load(run_dir / "config.yaml")

    pipeline = StableDiffusionPipeline.from_pretrained(run_dir / "pipeline", torch_dtype=torch.float32)
    if target.exists():
        shutil.rmtree(target)
    pipeline.unet.to(torch.float16)
    pipeline.vae.to(torch.float16)
    pipeline.save_pretrained(target)
    grids = sorted((run_dir / "validation").glob("*.png"))
    if grids:
        shutil.copyfile(grids[-1], target / "samples.png")
    vae = json.loads((run_dir / "vae" / "training.json").read_text())
    wall = json.loads((run_dir / "wall_minutes.json").read_text())
    minutes = wall["minutes"] + (0.0 if wall.get("includes_vae") else vae["minutes"])
    first, last, steps = _losses(run_dir)
    images = captioned_mix("all", size=config.model.image_size, seed=config.train.seed,
                           exclude=list(config.data.exclude), **dict(config.data.options))  # fmt: skip
    families = collections.Counter(SUBJECTS[label].split(" ")[0] for label in images.targets)
    size_mb = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 2**20
    m, o = config.model, config.optim
    text = "trained jointly with the U-Net" if m.train_text_encoder else "frozen at its random initialisation"
    latent = m.image_size // 2 ** (len(m.vae_channels) - 1)
    card = f"""# tiny_sd

A tiny text-to-image latent diffusion model in diffusers' `StableDiffusionPipeline` layout, pretrained from scratch
by visionpeft on this machine's CPU on {len(images):,} captioned 32 px images whose pixels ship inside scikit-learn and
scikit-image - so that personalization (and later control) can be shown to *learn*, offline, with no hub model.

```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("checkpoints/tiny_sd", torch_dtype=torch.float32)
image = pipe("a handwritten digit three", num_inference_steps=20, guidance_scale={config.train.guidance_scale},
             generator=torch.Generator().manual_seed(0)).images[0]  # 32 x 32
```

![samples](samples.png)

Rows of `samples.png`: {", ".join(f'"{p}"' for p in _validation_prompts())}.

## Architecture ({size_mb:.1f} MB on disk)
- `AutoencoderKL`: block widths {list(m.vae_channels)}, {m.latent_channels} latent channels: 32 px ->
  {latent} x {latent} x {m.latent_channels} latents (vae_scale_factor {2 ** (len(m.vae_channels) - 1)});
  `scaling_factor` {vae["scaling_factor"]:.4f} = 1 / the measured latent std;
  {_parameters(pipeline.vae):,} parameters (fp16 file).
- `UNet2DConditionModel`: block widths {list(m.unet_channels)} (cross-attention in all but the first),
  {m.layers_per_block} resnet per block, `sample_size` {latent} (the pipeline draws 32 px by default),
  `cross_attention_dim` {m.text_width}; {_parameters(pipeline.unet):,} parameters (fp16 file).
- `CLIPTextModel`: width {m.text_width}, {m.text_layers} layers, {m.text_heads} heads, {m.max_tokens} positions;
  {_parameters(pipeline.text_encoder):,} parameters, of which the 49,408-token embedding table is
  {49408 * m.text_width:,} (fp32 file: transformers keeps a checkpoint's dtype, and textual inversion trains it).
- `CLIPTokenizer`: the CLIP BPE vocabulary shipped in open_clip (`visionpeft/data/clip_vocab.py`), model_max_length
  {m.max_tokens}.
- Scheduler: DDPM training (1000 steps, scaled-linear betas 0.00085-0.012 as Stable Diffusion, epsilon prediction);
  the folder ships a `DDIMScheduler` over the same schedule (20 steps are enough).
- Text encoder: {text}. Why: its 2 small layers cost little next to the U-Net, and a trained encoder gives each
  caption word (digit names, colours, nouns) an embedding the U-Net's cross-attention can read apart; words never
  seen in pretraining (`seven`, `brick`) keep their random embeddings, which is what textual inversion starts from.
  Not measured against a frozen random encoder (no CPU time for a second pretraining run).

## Data (`visionpeft/data/captioned_mix.py`, split `all`)
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
- VAE: {vae["steps"]} steps, batch {config.vae.batch_size}, AdamW lr {config.vae.lr} (cosine), pixel MSE +
  {config.vae.kl_weight} x KL; final train MSE {vae["final_train_mse"]:.4f}, reconstruction MSE (images in [-1, 1])
  {vae["reconstruction_mse"]:.4f}; {vae["minutes"]:.1f} minutes.
- U-Net + text encoder: {steps} steps, batch {config.data.batch_size}, AdamW lr {o.lr} ({o.schedule}, {o.warmup_steps}
  warmup), weight decay {o.weight_decay}, grad clip {o.clip_grad}, min-SNR gamma {o.snr_gamma}, caption dropout
  {config.data.caption_dropout} (classifier-free guidance), EMA {config.train.ema_decay} (shipped); loss (min-SNR
  weighted epsilon MSE) {first:.4f} over the first logged steps -> {last:.4f} over the last.
- **Wall time: {minutes:.1f} minutes** all in (both stages, validation grids, saves), one thread on a 2-core CPU shared
  with other jobs.
- Command: `{command}` (`--resume` continues an interrupted run; `--export-only` rewrites this folder).

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
