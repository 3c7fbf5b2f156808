"""Fine-tune the decoder of a pipeline's VAE alone (encoder frozen: the latents and the U-Net stay valid), as
Stability's ``sd-vae-ft-mse``; writes a plain diffusers ``AutoencoderKL`` folder with its model card.

    python tools/finetune_vae_decoder.py --pipeline checkpoints/tiny_sd --out checkpoints/tiny_sd_vae_ft
    python tools/finetune_vae_decoder.py --pipeline PIPELINE_OR_VAE --images FOLDER --out my_vae --steps 2000

The embedded pipeline trains on its own pretraining mix (held-out subjects left out); any other VAE on the images of
``--images`` (centre-cropped to its ``sample_size``). Use the result with ``StableDiffusionPipeline.from_pretrained(
PIPELINE, vae=AutoencoderKL.from_pretrained(OUT))`` or ``visionpeft generate --vae OUT``. An existing non-empty
``--out`` is replaced only with ``--overwrite`` (and only once the new folder is complete). It trains on ``--device``
(default: cuda when there is one); the images are held in memory, and the error is measured 64 images at a time.
Code: ``visionpeft/demo/vae_decoder.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visionpeft.cli.common import positive_int, run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, required=True, help="a pipeline folder (its vae/) or a VAE folder")
    parser.add_argument("--out", type=Path, required=True, help="the new VAE folder")
    parser.add_argument("--images", type=Path, help="fine-tune on this image folder (default: the embedded mix)")
    parser.add_argument("--steps", type=positive_int, default=10000)
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (cosine to 0)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    from visionpeft.errors import ConfigError
    from visionpeft.io import kind_problem

    if args.out.exists() and kind_problem(args.out, "folder"):
        raise ConfigError(f"--out {args.out} {kind_problem(args.out, 'folder')}; give a new folder")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise ConfigError(f"{args.out} is not empty; give a new folder or --overwrite to replace it")
    if args.lr <= 0:
        raise ConfigError(f"--lr {args.lr} is not positive")
    import torch

    from visionpeft.cli.common import configure_logging
    from visionpeft.cli.generate import check_device
    from visionpeft.demo.vae_decoder import finetune_decoder

    device = check_device(args.device)
    configure_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(["python tools/finetune_vae_decoder.py", *argv])
    record = finetune_decoder(
        args.pipeline, args.out, args.steps, args.lr, args.batch_size, args.seed, args.images, command, device
    )
    print(
        f"wrote {args.out}: reconstruction mse {record['mse_before']:.4f} -> {record['reconstruction_mse']:.4f} "
        f"({record['wall_minutes']:.1f} minutes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
