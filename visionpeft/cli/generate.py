"""Sample a prompt x seed grid from a diffusers pipeline with any combination of saved adapters.

    python tools/generate.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --adapter runs/ti-cat/adapter --adapter runs/lora-cat/diffusers \\
        --prompt "a photo of <my-cat> on a beach" --prompt "<my-cat> in the snow" --seeds 0 1 2 --out grid.png

An adapter is a visionpeft adapter folder (``adapter_config.json``), or a folder / file in diffusers' formats:
``pytorch_lora_weights.safetensors`` (``load_lora_weights``) and ``learned_embeds.safetensors``
(``load_textual_inversion``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def apply_adapter(pipe, path: Path) -> str:
    """Loads one adapter into ``pipe``; returns how it was loaded."""
    import visionpeft as vp
    from visionpeft.errors import CheckpointError

    if path.is_dir() and (path / "adapter_config.json").is_file():
        vp.load_adapter(pipe, path)
        return "visionpeft"
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        raise CheckpointError(f"no adapter at {path}")
    kinds = []
    for file in files:
        if file.name == "learned_embeds.safetensors" or "embeds" in file.stem:
            pipe.load_textual_inversion(str(file))
            kinds.append("textual inversion")
        else:
            pipe.load_lora_weights(str(file.parent), weight_name=file.name)
            kinds.append("lora")
    return " + ".join(kinds)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id or local pipeline folder")
    parser.add_argument("--adapter", action="append", default=[], type=Path, help="may be repeated")
    parser.add_argument("--prompt", action="append", required=True, help="may be repeated (one grid row each)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one grid column each")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=Path, default=Path("grid.png"))
    args = parser.parse_args(argv)

    import torch
    from diffusers.utils import make_image_grid

    from visionpeft.backbones.diffusers_loading import load_pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.model, getattr(torch, args.dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    for adapter in args.adapter:
        print(f"adapter {adapter}: {apply_adapter(pipe, adapter)}")
    size = {"height": args.size, "width": args.size} if args.size else {}
    images = []
    for prompt in args.prompt:
        for seed in args.seeds:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            images += pipe(
                prompt,
                negative_prompt=args.negative_prompt,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=generator,
                **size,
            ).images
    grid = make_image_grid(images, rows=len(args.prompt), cols=len(args.seeds))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({len(args.prompt)} prompts x {len(args.seeds)} seeds, {grid.size[0]}x{grid.size[1]} px)")
    return 0
