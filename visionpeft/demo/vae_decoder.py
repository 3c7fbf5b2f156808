"""A pipeline's VAE with its decoder fine-tuned alone, Stability's ``sd-vae-ft-mse`` recipe: the encoder (and so
every latent, the ``scaling_factor`` and the U-Net trained on them) stays as it is, and only the decoder learns to
turn those latents back into sharper, truer-coloured pixels. The result is a plain ``AutoencoderKL`` folder that
drops into the same pipeline::

    vae = AutoencoderKL.from_pretrained("checkpoints/tiny_sd_vae_ft")
    pipe = StableDiffusionPipeline.from_pretrained("checkpoints/tiny_sd", vae=vae)

(``visionpeft generate --vae FOLDER`` does the same.) The images are the pipeline's own pretraining mix (its held-out
subjects left out, as its ``training.json`` records them) for the embedded pipeline, or any image folder, resized and
centre-cropped to the VAE's ``sample_size``. The loop is :func:`~.tiny_sd_parts.train_vae` in its ``decoder_only``
mode (the same loop that trained the embedded VAE). The card reports the reconstruction MSE before and after on
the training images and on images no step saw (the held-out subjects; none for a folder), and, for the embedded
pipeline, the fill IoU of reconstructed fill50k pairs in its eight colours: how faithfully the decoder draws the
colours the U-Net asks for.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, ModelLoadError

#: what a written folder holds besides the ``AutoencoderKL`` weights and config: the model card, the record and
#: the picture of reconstructions (original / base decoder / fine-tuned decoder)
CARD, RECORD, SHEET = "README.md", "training.json", "reconstructions.png"


def pipeline_vae(source: str | Path):
    """The ``AutoencoderKL`` of a pipeline folder (its ``vae/``) or of a VAE folder, in fp32.

    Raises:
        ModelLoadError: Neither a pipeline folder with a ``vae/`` nor a VAE folder.
    """
    import torch

    from ..backbones.diffusers_loading import load_vae

    source = Path(source)
    folder = source / "vae" if (source / "vae" / "config.json").is_file() else source
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{source} is neither a pipeline folder with a vae/ nor a VAE folder (no config.json)")
    return load_vae(str(folder), torch.float32)


def training_images(pipeline: Path, images: Path | None, size: int, seed: int) -> tuple[np.ndarray, Any, str]:
    """``(training images, unseen images, description)``, uint8 (N, size, size, 3) each: the folder's images (resized
    so the short side is ``size``, centre-cropped; no unseen ones: None), else the embedded pipeline's pretraining
    mix without its held-out subjects, and the images of those subjects (what no step sees)."""
    if images is not None:
        from PIL import Image, ImageOps

        from ..data.few_images import load_images

        loaded = load_images(images)
        crops = [np.asarray(ImageOps.fit(image, (size, size), Image.BICUBIC)) for image in loaded]
        return np.stack(crops), None, f"{len(crops)} images of {images} at {size} px"
    from .captioned_mix import SUBJECTS, captioned_mix

    record = pipeline / RECORD
    if not record.is_file():
        raise ConfigError(
            f"{pipeline} has no {RECORD} (the embedded pipeline's record of its pretraining data); "
            "give the images to fine-tune on with --images FOLDER"
        )
    held_out = json.loads(record.read_text()).get("held_out", [])
    mix = captioned_mix("all", size=size, seed=seed, exclude=held_out)
    others = [subject for subject in SUBJECTS if subject not in held_out]
    unseen = captioned_mix("all", size=size, seed=seed, exclude=others).images if held_out else None
    described = f"the captioned mix ({len(mix)} images at {size} px; held out: {', '.join(held_out) or 'none'})"
    return mix.images, unseen, described


def fill_colour_fidelity(vae, pairs: int = 64) -> float:
    """Mean fill IoU of the VAE's reconstructions of ``pairs`` fill50k targets in the tiny pipeline's eight colours
    (generator seed 1, the control gallery's held-out pairs): the ceiling of any control's fill IoU through it."""
    import tempfile

    import torch

    from ..data.fill50k import fill_iou, make_fill50k
    from ..data.images import load_rgb
    from .captioned_mix import CIRCLE_COLOURS
    from .tiny_sd_parts import to_pixels

    size = vae.config.sample_size
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_fill50k(Path(tmp), n=pairs, size=size, seed=1, palette=CIRCLE_COLOURS)
        records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        targets = np.stack([np.asarray(load_rgb(folder / record["image"])) for record in records])
    with torch.no_grad():
        decoded = vae.decode(vae.encode(to_pixels(targets).to(vae.device)).latent_dist.mode()).sample.cpu()
    pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    from PIL import Image

    return float(np.mean([fill_iou(Image.fromarray(p), r) for p, r in zip(pixels, records)]))


def finetune_decoder(
    pipeline: str | Path,
    out: str | Path,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    images: str | Path | None = None,
    command: str = "",
    device: str | Any = "cpu",
) -> dict[str, Any]:
    """Fine-tunes the decoder of ``pipeline``'s VAE and writes ``out`` (``AutoencoderKL`` folder in fp32,
    ``training.json``, model card ``README.md``), training on ``device``; returns the training record. The folder is
    written beside ``out`` first and takes its place only when complete (an interrupted run leaves an existing
    ``out`` as it was)."""
    import torch
    from omegaconf import OmegaConf

    from .tiny_sd_parts import reconstruction_mse, to_pixels, train_vae

    pipeline, out = Path(pipeline), Path(out)
    vae = pipeline_vae(pipeline).to(device)
    base = copy.deepcopy(vae).eval()
    size = vae.config.sample_size
    pixels, unseen, described = training_images(pipeline, Path(images) if images else None, size, seed)
    start = time.time()
    torch.manual_seed(seed)
    held = None if unseen is None else to_pixels(unseen)
    before = {"held_out_mse": reconstruction_mse(vae, held) if held is not None else None}
    if images is None:
        before["fill_iou"] = fill_colour_fidelity(vae)
    stage = OmegaConf.create({"steps": steps, "lr": lr, "batch_size": batch_size, "kl_weight": 0.0})
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    record = train_vae(vae, pixels, stage, seed, partial, decoder_only=True)
    after = {"held_out_mse": reconstruction_mse(vae, held) if held is not None else None}
    if images is None:
        after["fill_iou"] = fill_colour_fidelity(vae)
    record |= {
        "base": str(pipeline),
        "data": described,
        "seed": seed,
        "before": before,
        "after": after,
        "command": command,
        "device": str(device),
        "wall_minutes": (time.time() - start) / 60,
    }
    (partial / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    reconstruction_sheet(base, vae, to_pixels(pixels), held, partial / SHEET)
    (partial / CARD).write_text(card(record, vae, out))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return record


def reconstruction_sheet(base, tuned, seen, unseen, path: Path, columns: int = 12) -> None:
    """Rows original / ``base``'s reconstruction / ``tuned``'s (the same latents) of ``columns`` images: evenly
    spaced over the training images ``seen``, the last third over ``unseen`` when given (images in [-1, 1]),
    enlarged to at least 128 px a cell."""
    import torch
    from PIL import Image

    from ..data.image_grid import image_grid, scale_for

    def spaced(pixels, n: int):
        return pixels[torch.linspace(0, len(pixels) - 1, min(n, len(pixels))).long()]

    tail = columns // 3 if unseen is not None else 0
    chosen = torch.cat([spaced(seen, columns - tail)] + ([spaced(unseen, tail)] if tail else []))
    with torch.no_grad():
        rows = [chosen] + [
            vae.decode(vae.encode(chosen.to(vae.device)).latent_dist.mode()).sample.cpu() for vae in (base, tuned)
        ]
    pictures = [
        [Image.fromarray(((image.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()) for image in row]
        for row in rows
    ]
    image_grid(pictures, scale=scale_for(chosen.shape[-1]), gap=4, margin=4).save(path)


def card(record: dict[str, Any], vae, out: Path) -> str:
    """The model card of a fine-tuned decoder."""
    base, before, after = record["base"], record["before"], record["after"]
    decoder = sum(p.numel() for name, p in vae.named_parameters() if not name.startswith(("encoder.", "quant_conv.")))
    rows = [
        "| measure | base decoder | fine-tuned decoder |",
        "|---|---:|---:|",
        f"| reconstruction MSE, training images (images in [-1, 1]) | {record['mse_before']:.4f} | "
        f"{record['reconstruction_mse']:.4f} |",
    ]
    if before["held_out_mse"] is not None:
        rows.append(
            f"| reconstruction MSE, the held-out subjects (no step saw them) | {before['held_out_mse']:.4f} | "
            f"{after['held_out_mse']:.4f} |"
        )
    if "fill_iou" in before:
        rows.append(
            "| fill IoU of reconstructed fill50k targets (64 pairs of generator seed 1, eight colours) | "
            f"{before['fill_iou']:.3f} | {after['fill_iou']:.3f} |"
        )
    return f"""# {out.name}

The VAE of `{base}` with its **decoder fine-tuned alone** (Stability's `sd-vae-ft-mse` recipe): the encoder
and `quant_conv` are bit-identical to the base, so every latent, the `scaling_factor`
({vae.config.scaling_factor:.4f}) and the U-Net trained on them are unchanged; only how latents become pixels
improves. A drop-in replacement:

```python
from diffusers import AutoencoderKL, StableDiffusionPipeline

vae = AutoencoderKL.from_pretrained("{out}")
pipe = StableDiffusionPipeline.from_pretrained("{base}", vae=vae)
```

or `visionpeft generate --model {base} --vae {out} --prompt ...`.

- **Data**: {record["data"]}.
- **Training**: {record["steps"]:,} steps, batch {record["batch_size"]}, AdamW lr {record["lr"]} (cosine to 0), pixel
  MSE of the decoder's reconstruction of sampled latents, seed {record["seed"]}; {decoder:,} decoder parameters
  trained; {record["wall_minutes"]:.1f} minutes on {record["device"]}.
- **Command**: `{record["command"]}`

{chr(10).join(rows)}

Rows: original / the base decoder / the fine-tuned decoder (the same latents); the last third of the columns (when
there are held-out subjects) are images no step saw.

![reconstructions]({SHEET})
"""
