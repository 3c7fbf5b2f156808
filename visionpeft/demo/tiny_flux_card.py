"""Export of the pretrained tiny Flux-layout pipeline: the ``save_pretrained`` folder plus its model card.

The run's ``RUN/pipeline`` (fp32) is shipped with the transformer and the VAE in fp16 (diffusers loads them back as
fp32) and both text encoders in fp32 (transformers keeps a checkpoint's dtype); ``training.json`` and ``README.md``
are written from what the run recorded: base pipeline, latent normalisation, steps, losses, wall time, sample grid.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

from ..io import shown_path
from .captioned_mix import SUBJECTS
from .tiny_sd_card import _losses, _parameters, _validation_prompts, ship_run_pipeline
from .tiny_sd_parts import TRAINING_RECORD

#: ``RUN/<this>``: a line on how the run went beyond its command (an interrupted and resumed session), for the card
HISTORY = "history.txt"

CARD_LIMITS = """\
What it can draw: at best the families it saw, at 32 px, with the quality the gallery measures
(`gallery/diffusion/tiny_flux/README.md`: the judge's rate per digit prompt). What it cannot draw: anything outside
the 22 pretraining subjects - the held-out digit 7 and brick texture included (personalization has to teach them),
legible text, fine detail, compositions, other resolutions (the transformer runs at other sizes, without having
learned them). It is a test bed for Flux code paths (packed latents, T5 + pooled CLIP conditioning, flow matching,
true CFG), not a small FLUX.1."""


def training_record(config, run_dir: Path, command: str) -> dict:
    """The exported folder's ``training.json``: the reused parts, the latent normalisation, the one training stage,
    the held-out subjects and the minutes."""
    from .pretrain_flux import t5_tokens

    wall = json.loads((run_dir / "wall_minutes.json").read_text())
    normalisation = json.loads((run_dir / "vae_normalisation.json").read_text())
    first, last, steps = _losses(run_dir)
    o = config.optim
    base_record = Path(config.model.base) / TRAINING_RECORD
    base_held_out = json.loads(base_record.read_text())["held_out"] if base_record.is_file() else None
    stage = {
        "command": command,
        "trains": ["transformer", "text_encoder_2"],
        "frozen": ["vae", "text_encoder"],
        "steps": steps,
        "batch_size": config.data.batch_size,
        "lr": o.lr,
        "schedule": o.schedule,
        "warmup_steps": o.warmup_steps,
        "weight_decay": o.weight_decay,
        "clip_grad": o.clip_grad,
        "weighting_scheme": o.weighting_scheme or "none",
        "max_sequence_length": t5_tokens(config),
        "caption_dropout": config.data.caption_dropout,
        "ema_decay": config.train.ema_decay,
        "first_loss": first,
        "last_loss": last,
        "threads": wall.get("threads"),
        "minutes": wall["minutes"],
    }
    history = run_dir / HISTORY
    record = {"note": history.read_text().strip()} if history.is_file() else {}
    return {
        **record,
        "family": "flux",
        "base": {"folder": shown_path(config.model.base), "held_out": base_held_out, "reused": ["vae", "text_encoder"]},
        "vae": normalisation,
        "stages": [stage],
        "held_out": sorted(config.data.exclude),
        "sampling": {
            "height": config.model.image_size,
            "width": config.model.image_size,
            "max_sequence_length": t5_tokens(config),
            "true_cfg_scale": config.train.guidance_scale,
            "negative_prompt": "",
            "num_inference_steps": config.train.validation_steps,
        },
        "minutes": wall["minutes"],
    }


def export_flux_pipeline(config, run_dir: Path, target: Path, command: str) -> Path:
    """Writes ``target``: the pipeline (transformer / VAE fp16, text encoders fp32), a sample grid, ``training.json``
    and ``README.md``; the card describes the run as it was configured (``RUN/config.yaml``)."""
    from diffusers import FluxPipeline

    config, pipeline, record, images = ship_run_pipeline(
        FluxPipeline, ("transformer", "vae"), training_record, config, run_dir, target, command
    )
    families = collections.Counter(SUBJECTS[label].split(" ")[0] for label in images.targets)
    size_mb = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 2**20
    t, vae, clip = pipeline.transformer.config, pipeline.vae.config, pipeline.text_encoder.config
    t5 = pipeline.text_encoder_2.config
    s, n, sampling = record["stages"][0], record["vae"], record["sampling"]
    factor = 2 ** (len(vae.block_out_channels) - 1)
    latent = config.model.image_size // factor
    history = f"- History: {record['note']}\n" if record.get("note") else ""
    card = f"""# tiny_flux

A tiny text-to-image model in diffusers' `FluxPipeline` layout (double- and single-stream transformer blocks over
2 x 2 packed latents, T5 hidden states + pooled CLIP conditioning, rotary position ids, flow matching), pretrained by
visionpeft on this machine's CPU on the same {len(images):,} captioned 32 px images as `checkpoints/tiny_sd` - so that
personalization of a Flux-layout pipeline can be shown to *learn*, offline, with no hub model.

```python
import torch
from diffusers import FluxPipeline

pipe = FluxPipeline.from_pretrained("checkpoints/tiny_flux", torch_dtype=torch.float32)
generator = torch.Generator().manual_seed(0)
image = pipe(
    "a handwritten digit three",
    height={sampling["height"]},
    width={sampling["width"]},  # FluxPipeline's default size is 128 x vae_scale_factor
    max_sequence_length={sampling["max_sequence_length"]},  # T5's trained length (the default 512 was never seen)
    negative_prompt="",
    true_cfg_scale={sampling["true_cfg_scale"]},  # no guidance embedding: true classifier-free guidance
    num_inference_steps={sampling["num_inference_steps"]},
    generator=generator,
).images[0]  # 32 x 32
```

`visionpeft.demo.tiny_flux_parts.sampling_options(max_sequence_length, true_cfg_scale)` gives these keywords.

![samples](samples.png)

Rows of `samples.png`: {", ".join(f'"{p}"' for p in _validation_prompts())}.

## Architecture ({size_mb:.1f} MB on disk)
- `FluxTransformer2DModel`: {t.num_layers} double-stream + {t.num_single_layers} single-stream blocks,
  {t.num_attention_heads} heads x {t.attention_head_dim} (width {t.num_attention_heads * t.attention_head_dim}),
  rotary axes {list(t.axes_dims_rope)}, `in_channels` {t.in_channels} ({vae.latent_channels} latent channels packed
  2 x 2: {latent} x {latent} latents -> {(latent // 2) ** 2} image tokens),
  `joint_attention_dim` {t.joint_attention_dim}, `pooled_projection_dim` {t.pooled_projection_dim},
  `guidance_embeds` {t.guidance_embeds} (FLUX.1-schnell's layout: no distilled guidance input);
  {_parameters(pipeline.transformer):,} parameters (fp16 file). Trained from scratch.
- `T5EncoderModel` (`text_encoder_2`, T5 v1.1 layout): width {t5.d_model}, {t5.num_layers} layers, {t5.num_heads}
  heads, gated-GELU feed-forward {t5.d_ff}; {_parameters(pipeline.text_encoder_2):,} parameters (fp32). Trained from
  scratch with the transformer.
- `T5TokenizerFast` (`tokenizer_2`): built offline (`visionpeft.demo.tiny_flux_parts.t5_tokenizer`: a Unigram model
  with one piece per caption word plus single letters, T5's pad / `</s>` / `<unk>` conventions),
  {len(pipeline.tokenizer_2)} tokens, model_max_length {pipeline.tokenizer_2.model_max_length}.
- `AutoencoderKL` and `CLIPTextModel` + `CLIPTokenizer` (`text_encoder`, CLIP-L's role: its pooled output): those
  of `{record["base"]["folder"]}`, frozen. The VAE's `shift_factor` {n["shift_factor"]:.4f} and `scaling_factor`
  {n["scaling_factor"]:.4f} are the mean and 1 / std of its latents of the training images (Flux normalises latents
  with both); CLIP width {clip.hidden_size}.
- Scheduler: `FlowMatchEulerDiscreteScheduler` with FLUX.1-dev's config (shift 3, dynamic shifting 0.5 .. 1.15 over
  256 .. 4096 image tokens; at {(latent // 2) ** 2} tokens the pipeline's `mu` extrapolates below 0.5).

## Data (`visionpeft/demo/captioned_mix.py`, split `all`)
| family | images |
|---|---:|
{chr(10).join(f"| {f} | {families[f]} |" for f in ("digit", "texture", "face", "photo", "circle"))}

**Held out** (never seen by any part, the reused VAE and CLIP included: `{record["base"]["folder"]}` held out
{", ".join(record["base"]["held_out"] or ["?"])}): {", ".join(config.data.exclude)}.

## Training
- Transformer + T5 (`{s["command"]}`): {s["steps"]} steps, batch {s["batch_size"]}, AdamW lr {s["lr"]}
  ({s["schedule"]}, {s["warmup_steps"]} warmup), weight decay {s["weight_decay"]}, grad clip {s["clip_grad"]};
  Flux's flow-matching loss (`visionpeft.trainers.flow_matching`: target noise - latents, timestep density
  `{s["weighting_scheme"]}`), T5 padded to {s["max_sequence_length"]} tokens, caption dropout {s["caption_dropout"]}
  (true classifier-free guidance), EMA {s["ema_decay"]} (shipped); loss {s["first_loss"]:.4f} over the first logged
  steps -> {s["last_loss"]:.4f} over the last.
{history}- **Wall time: {record["minutes"]:.1f} minutes** (training, validation grids, saves) on {s["threads"]} thread
  of a 2-core CPU shared with other jobs, plus `{record["base"]["folder"]}`'s VAE stage (its own card).
- `python tools/pretrain.py configs/pretrain/tiny_flux.yaml` re-makes this folder (`--export-only` rewrites it from
  the run folder); `training.json` holds this record.

## Limits
{CARD_LIMITS}
"""
    (target / "README.md").write_text(card)
    return target
