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
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

from .eval import positive_int


def read_weights(file: Path) -> dict[str, Any]:
    """The tensors of a LoRA / embeddings file: safetensors, or a PyTorch pickle read with ``weights_only=True``
    (a file holding other objects is refused, never unpickled).

    Raises:
        CheckpointError: The file is corrupt, truncated, not a weights file, or holds objects other than tensors.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from visionpeft.errors import CheckpointError

    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then reads fine
            warnings.simplefilter("ignore", UserWarning)
            state = load_file(file) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu",
                                                                                     weights_only=True)  # fmt: skip
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file} holds objects other than tensors; refusing to unpickle it") from None
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise CheckpointError(f"{file} is not a readable weights file ({reason})") from None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{file} does not hold a dictionary of tensors")
    return state


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
        state = read_weights(file)
        kind = "textual inversion" if file.name == "learned_embeds.safetensors" or "embeds" in file.stem else "lora"
        try:
            if kind == "lora":
                pipe.load_lora_weights(state)
            else:
                pipe.load_textual_inversion(state)
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError, AttributeError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise CheckpointError(f"{file} cannot be loaded as a {kind} into this pipeline: {reason}") from None
        kinds.append(kind)
    return " + ".join(kinds)


def check_out(out: Path) -> None:
    """Fails before any model loads when the grid could not be written to ``out``."""
    from PIL import Image

    from visionpeft.errors import ConfigError

    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out / 'grid.png'}")
    if out.suffix.lower() not in Image.registered_extensions():
        raise ConfigError(f"--out {out}: '{out.suffix}' is not an image format; use .png or .jpg")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot create its folder ({err.strerror or err})") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ConfigError(f"--out {out} is not writable")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id or local pipeline folder")
    parser.add_argument("--adapter", action="append", default=[], type=Path, help="may be repeated")
    parser.add_argument("--prompt", action="append", required=True, help="may be repeated (one grid row each)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one grid column each")
    parser.add_argument("--steps", type=positive_int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--size", type=positive_int, default=None, help="image side (default: the model's)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=Path, default=Path("grid.png"))
    args = parser.parse_args(argv)
    check_out(args.out)

    import torch
    from diffusers.utils import make_image_grid

    from visionpeft.backbones.diffusers_loading import load_pipeline
    from visionpeft.errors import ConfigError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.model, getattr(torch, args.dtype)).to(device)
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    if args.size and args.size % factor:
        raise ConfigError(
            f"--size {args.size} is not a multiple of the VAE's factor {factor}; "
            f"try --size {max(factor, args.size // factor * factor)}"
        )
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
    try:
        grid.save(args.out)
    except OSError as err:
        raise ConfigError(f"cannot write {args.out} ({err.strerror or err})") from None
    print(f"wrote {args.out} ({len(args.prompt)} prompts x {len(args.seeds)} seeds, {grid.size[0]}x{grid.size[1]} px)")
    return 0
