"""Sample a prompt x seed grid from a diffusers pipeline with any combination of saved adapters and controls.

    python tools/generate.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --adapter runs/ti-cat/adapter --adapter runs/lora-cat/diffusers \\
        --prompt "a photo of <my-cat> on a beach" --prompt "<my-cat> in the snow" --seeds 0 1 2 --out grid.png

An adapter is a training run's folder (its ``adapter/``), a visionpeft adapter folder (``visionpeft_config.json``), or a
folder / file in diffusers' formats:
``pytorch_lora_weights.safetensors`` (``load_lora_weights``) and ``learned_embeds.safetensors``
(``load_textual_inversion``), or a ``ControlNetModel`` (Flux / SD3: ``FluxControlNetModel`` / ``SD3ControlNetModel``,
drawing what ``FluxControlNetPipeline`` / ``StableDiffusion3ControlNetPipeline`` draw) / ``T2IAdapter`` folder
(``--control RUN/controlnet``, with ``--control-image edges.png``; several controls each take their own: ``--control A
--control-image a.png --control B --control-image b.png``), or the ``controlnet/`` + ``unet/`` folders of a
ControlNet trained with ``sd_locked=false``, loaded together (``--control checkpoints/tiny_sd_controlnet_unlocked``:
its U-Net's decoder replaces the pipeline's). An IP-Adapter (``--ip-adapter RUN``: a run's
``ip_adapter/ip_adapter.safetensors``, or a released plain or plus IP-Adapter ``.safetensors``, with its image encoder
in ``image_encoder/`` beside it or ``--ip-image-encoder``) takes ``--ip-image ref.png`` as the image prompt of every
sample (``--ip-scale`` its weight). A Flux / SD3 pipeline encodes prompts with T5 at the T5 tokenizer's own length
when that is shorter than the pipeline's default (``--max-sequence-length`` sets it) and draws at its VAE's
``sample_size``; ``--true-cfg S`` gives Flux true classifier-free guidance (a transformer without a guidance
embedding, such as ``checkpoints/tiny_flux``). ``--vae FOLDER`` decodes with another ``AutoencoderKL`` of the same
latent space (a decoder fine-tuned by ``tools/finetune_vae_decoder.py``, Stability's ``sd-vae-ft-mse``).

A model trained with another prediction type than its scheduler says (``optim.change_prediction_type``) or with zero
terminal SNR samples with ``--prediction-type`` / ``--zero-terminal-snr`` (rescaled betas, trailing timesteps; best
with ``--guidance-rescale 0.7``).

All seeds of a prompt are drawn in one pipeline call (``--batch-size`` splits it), each from a generator of its own
seed: the same image a call for that seed alone gives. The grid enlarges small samples (nearest, to cells of at
least 128 px) and separates the cells with white lines.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

from .common import add_base_check_argument, positive_int, unit_float

#: White pixels between the cells of the grid and around them.
GAP = 4
#: The folder of a training run that holds its final adapter (``--adapter RUN`` loads it).
RUN_ADAPTER = "adapter"
#: The per-call input of an image prompt (the image encoder's embeddings of ``--ip-image``).
IMAGE_PROMPT = "ip_image_embeds"


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
            state = (
                load_file(file)
                if file.suffix == ".safetensors"
                else torch.load(file, map_location="cpu", weights_only=True)
            )
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file} holds objects other than tensors; refusing to unpickle it") from None
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise CheckpointError(f"{file} is not a readable weights file ({reason})") from None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{file} does not hold a dictionary of tensors")
    return state


def apply_adapter(pipe, path: Path, check_base: bool = True) -> str:
    """Loads one adapter into ``pipe``; returns how it was loaded."""
    import visionpeft as vp
    from visionpeft.checkpoint.folder import adapter_config_path
    from visionpeft.errors import CheckpointError
    from visionpeft.methods.textual_inversion import SDXL_EMBEDDING_KEYS

    if path.is_dir() and adapter_config_path(path) is None and adapter_config_path(path / RUN_ADAPTER) is not None:
        path = path / RUN_ADAPTER  # a training run's folder: its final adapter
    if path.is_dir() and adapter_config_path(path) is not None:
        vp.load_adapter(pipe, path, check_base=check_base)
        return "visionpeft"
    if path.is_dir() and (path / "config.json").is_file():
        return load_control_folder(pipe, path)
    if path.is_dir() and (path / "unet" / "config.json").is_file():
        return load_unlocked_controlnet(pipe, path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        raise CheckpointError(f"no adapter at {path}")
    kinds = []
    for file in files:
        state = read_weights(file)
        if set(state) == set(SDXL_EMBEDDING_KEYS):
            raise CheckpointError(
                f"{file} holds SDXL embeddings ({', '.join(SDXL_EMBEDDING_KEYS)}) without their token; pass the "
                "run's folder or its adapter/ folder instead"
            )
        embeddings = file.name == "learned_embeds.safetensors" or "embeds" in file.stem
        kind = "textual inversion" if embeddings else "LoRA"
        try:
            if embeddings:
                pipe.load_textual_inversion(state)
            else:
                pipe.load_lora_weights(state)
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError, AttributeError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise CheckpointError(f"{file} cannot be loaded as a {kind} into this pipeline: {reason}") from None
        kinds.append(kind)
    return " + ".join(kinds)


def load_control_folder(pipe, path: Path) -> str:
    """A diffusers model folder some method exports (``RUN/controlnet``, a released ControlNet or T2I-Adapter),
    attached as that method with the folder's weights; returns how it was loaded."""
    import visionpeft as vp
    from visionpeft.adapter import methods_of
    from visionpeft.methods.folders import read_diffusers_folder

    folder = read_diffusers_folder(path)
    vp.attach(pipe, folder.method, **folder.options)
    methods_of(pipe)[-1].load_folder_model(folder.model)
    return f"{folder.method} ({folder.class_name})"


def load_unlocked_controlnet(pipe, path: Path) -> str:
    """A folder holding ``unet/`` and one control folder beside it: an ``sd_locked=false`` ControlNet export
    (``checkpoints/tiny_sd_controlnet_unlocked``: ``controlnet/`` + ``unet/``). The control is attached with its
    weights and the U-Net's trained decoder taken into the pipeline's U-Net (restored on detach)."""
    import visionpeft as vp
    from visionpeft.adapter import methods_of
    from visionpeft.backbones.diffusers_loading import load_unet
    from visionpeft.errors import CheckpointError
    from visionpeft.methods.folders import read_diffusers_folder
    from visionpeft.registry import METHODS

    beside = sorted(p for p in path.iterdir() if p.is_dir() and p.name != "unet" and (p / "config.json").is_file())
    if len(beside) != 1:
        raise CheckpointError(
            f"{path} holds unet/ and {len(beside)} model folders beside it; an unlocked ControlNet export holds one "
            "(controlnet/)"
        )
    folder = read_diffusers_folder(beside[0])
    if not hasattr(METHODS.get(folder.method), "load_decoder") or not hasattr(pipe, "unet"):
        raise CheckpointError(f"{path} holds a {folder.class_name} beside unet/, which no U-Net decoder comes with")
    unet = load_unet(path / "unet")
    vp.attach(pipe, folder.method, **folder.options, sd_locked=False)
    method = methods_of(pipe)[-1]
    method.load_folder_model(folder.model)
    method.load_decoder(unet)
    return f"{folder.method} ({folder.class_name}) + its trained U-Net decoder"


def control_inputs(pipe, images: list, side: int) -> dict:
    """``{"control_image": ...}`` when attached methods read one: each image resized to ``side``, in [0, 1]. One
    image goes to every control; several pair in order with the controls in the order they were loaded
    (``--adapter`` folders' first, then each ``--control``), as ``{method name: image}``."""
    from visionpeft.adapter import methods_of
    from visionpeft.errors import ConfigError

    readers = [method.key for method in methods_of(pipe) if "control_image" in method.call_inputs]
    if not readers:
        if images:
            raise ConfigError("--control-image given, but no loaded adapter reads a control image")
        return {}
    if not images:
        raise ConfigError(f"the loaded adapters read control_image ({', '.join(readers)}): give --control-image")
    if len(images) > 1 and len(images) != len(readers):
        raise ConfigError(
            f"{len(images)} --control-image for {len(readers)} loaded controls ({', '.join(readers)}): give one "
            "image per control, in the --control order, or one for all"
        )
    import numpy as np
    import torch

    tensors = [
        torch.from_numpy(np.asarray(image.resize((side, side)), dtype=np.float32) / 255.0)
        .permute(2, 0, 1)[None]
        .to(pipe.device)
        for image in images
    ]
    return {"control_image": tensors[0] if len(tensors) == 1 else dict(zip(readers, tensors))}


def read_control_images(args) -> list:
    """The ``--control-image`` files read before any model loads; more of them than ``--control`` / ``--adapter``
    folders that could read them is one line."""
    from visionpeft.data.images import load_rgb
    from visionpeft.errors import ConfigError

    loaded = len(args.control) + len(args.adapter)
    if len(args.control_image) > max(1, loaded):
        raise ConfigError(
            f"{len(args.control_image)} --control-image for {len(args.control)} --control: give one image per "
            "control, in the --control order, or one for all"
        )
    return [load_rgb(path) for path in args.control_image]


def check_image_prompt(args):
    """The ``--ip-image`` read before any model loads (None without ``--ip-adapter``); one line when it is missing,
    unreadable, or given without an IP-Adapter."""
    from visionpeft.data.images import load_rgb
    from visionpeft.errors import ConfigError

    if args.ip_image is not None and args.ip_adapter is None:
        raise ConfigError("--ip-image is the image prompt of an IP-Adapter: give --ip-adapter RUN too")
    if args.ip_adapter is None:
        return None
    if args.ip_image is None:
        raise ConfigError("--ip-adapter needs --ip-image (the image prompt)")
    if args.ip_scale < 0:
        raise ConfigError(f"--ip-scale {args.ip_scale} is negative; 0 turns the image prompt off")
    return load_rgb(args.ip_image)


def default_side(pipe, patched: bool, factor: int) -> int:
    """The image side the model was made for: a U-Net's ``sample_size`` latents; for a Flux / SD3 transformer (which
    records none) its VAE's ``sample_size`` (1024 for FLUX.1-dev and SD3, 32 for the tiny Flux pipeline; the
    pipeline's own default, ``default_sample_size`` x the VAE factor, would draw the tiny one at 256 px)."""
    if not patched:
        return pipe.unet.config.sample_size * factor
    vae_side = getattr(getattr(pipe, "vae", None), "config", {}).get("sample_size")
    return vae_side if isinstance(vae_side, int) else pipe.default_sample_size * factor


def t5_options(pipe, max_sequence_length: int | None, true_cfg: float | None, negative_prompt: str | None) -> dict:
    """The call keywords of a pipeline with a T5 encoder (Flux, SD3): ``max_sequence_length`` (by default the T5
    tokenizer's ``model_max_length`` when shorter than the pipeline's default: what a small T5 was trained at) and
    Flux's ``true_cfg_scale`` with its negative prompt.

    Raises:
        ConfigError: ``--max-sequence-length`` for a pipeline without T5, or ``--true-cfg`` for one without true
            classifier-free guidance.
    """
    import inspect

    from visionpeft.backbones.diffusers_loading import T5_COMPONENTS, family_of_class
    from visionpeft.errors import ConfigError

    accepted = inspect.signature(pipe.__call__).parameters
    options: dict[str, Any] = {}
    if "max_sequence_length" in accepted:
        own = accepted["max_sequence_length"].default
        component = T5_COMPONENTS.get(family_of_class(type(pipe).__name__) or "", "")
        tokenizer = getattr(pipe, component.replace("text_encoder", "tokenizer"), None)  # absent: SD3 without T5
        trained = getattr(tokenizer, "model_max_length", own)
        if max_sequence_length is not None or (isinstance(trained, int) and trained < own):
            options["max_sequence_length"] = max_sequence_length or trained
    elif max_sequence_length is not None:
        raise ConfigError(f"--max-sequence-length: a {type(pipe).__name__} has no T5 encoder (Flux and SD3 do)")
    if true_cfg is not None:
        if "true_cfg_scale" not in accepted:
            raise ConfigError(f"--true-cfg: a {type(pipe).__name__} has no true_cfg_scale (Flux pipelines do)")
        options |= {"true_cfg_scale": true_cfg, "negative_prompt": negative_prompt or ""}
    return options


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


def check_device(name: str | None):
    """The ``torch.device`` to sample on (default: cuda when there is one, else cpu), checked before any model loads.

    Raises:
        ConfigError: A name torch does not know, or a device this machine does not have.
    """
    import torch

    from visionpeft.errors import ConfigError

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name} is not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "meta":
        raise ConfigError("--device meta holds no data; images need a real device (cpu, cuda, ...)")
    try:
        torch.empty(1, device=device)
    except Exception as err:  # whatever a backend raises (no driver, not compiled in, no such index) says the same
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:160]
        raise ConfigError(f"--device {name} is not available on this machine ({reason})") from None
    return device


def sample(pipe, prompt: str, seeds: list[int], options: dict, inputs: dict, batch_size: int | None) -> list:
    """The images of ``prompt`` for ``seeds``, ``batch_size`` at a time (default: all in one pipeline call).

    Each image has a generator of its own seed, which diffusers draws its starting noise from: an image is the one a
    call for its seed alone gives (up to the last bits of float rounding of a batched kernel), whatever the batch.
    A Flux ControlNet's condition is drawn from those generators first, as ``FluxControlNetPipeline`` draws it; what
    a pipeline draws from torch's global stream (an SD3 ControlNet's condition, as
    ``StableDiffusion3ControlNetPipeline``) comes from it seeded with the call's first seed, so it repeats from run
    to run (in a batch, each image is then not the one its seed alone gives).
    """
    import torch

    import visionpeft as vp
    from visionpeft.trainers.control_inputs import draw_conditions

    step = batch_size or len(seeds)
    images = []
    for start in range(0, len(seeds), step):
        chunk = seeds[start : start + step]
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in chunk]
        given = {key: _per_sample(value, len(chunk)) if key == IMAGE_PROMPT else value for key, value in inputs.items()}
        torch.manual_seed(chunk[0])
        with vp.conditioning(pipe, **given) if given else contextlib.nullcontext():
            if given:
                draw_conditions(pipe, generators, len(chunk))
            images.extend(pipe(prompt, num_images_per_prompt=len(chunk), generator=generators, **options).images)
    return images


def _per_sample(prompt, count: int):
    """One image prompt per sample; guidance's doubled batch gets zeros beside them, or the negative of a
    ``(negative, positive)`` pair (IP-Adapter-plus)."""
    if isinstance(prompt, tuple):
        return tuple(_per_sample(part, count) for part in prompt)
    return prompt.expand(count, *prompt.shape[1:])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id or local pipeline folder")
    parser.add_argument("--adapter", action="append", default=[], type=Path, help="may be repeated")
    parser.add_argument("--prompt", action="append", required=True, help="may be repeated (one grid row each)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one grid column each")
    parser.add_argument("--steps", type=positive_int, default=30)
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale (default: 7.5 on a U-Net pipeline; a Flux / SD3 pipeline's own: 3.5 / 7.0)",
    )
    parser.add_argument(
        "--guidance-rescale",
        type=unit_float,
        default=0.0,
        help="rescale classifier-free guidance (the pipeline's guidance_rescale; 0.7 for zero-terminal-SNR models)",
    )
    parser.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        default=None,
        help="what the model predicts, when not what its scheduler says (default: the scheduler's)",
    )
    parser.add_argument(
        "--zero-terminal-snr",
        action="store_true",
        help="sample a model trained with optim.rescale_zero_terminal_snr (rescaled betas, trailing timesteps)",
    )
    parser.add_argument("--size", type=positive_int, default=None, help="image side (default: the model's)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    parser.add_argument("--out", type=Path, default=Path("grid.png"))
    parser.add_argument(
        "--control",
        action="append",
        default=[],
        type=Path,
        help="a ControlNet / T2I-Adapter: diffusers folder (RUN/controlnet) or visionpeft adapter",
    )
    parser.add_argument(
        "--control-image",
        action="append",
        default=[],
        type=Path,
        help="the condition image (edges, a fill50k outline, ...); repeated: one per --control, in order",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per pipeline call (default: all seeds of a prompt)",
    )
    parser.add_argument("--ip-adapter", type=Path, help="an IP-Adapter: a run folder or its .safetensors file")
    parser.add_argument("--ip-image", type=Path, help="the image prompt of the IP-Adapter")
    parser.add_argument(
        "--ip-image-encoder", type=Path, help="its CLIP image encoder folder (default: image_encoder/ beside it)"
    )
    parser.add_argument("--ip-scale", type=float, default=1.0, help="weight of the image prompt (0: none)")
    parser.add_argument(
        "--max-sequence-length",
        type=positive_int,
        help="T5 tokens of a Flux / SD3 prompt (default: the T5 tokenizer's model_max_length, at most the "
        "pipeline's own 512 / 256)",
    )
    parser.add_argument(
        "--true-cfg",
        type=float,
        help="Flux: true classifier-free guidance at this scale against --negative-prompt ('' when not given), for a "
        "transformer without a guidance embedding (checkpoints/tiny_flux: 3)",
    )
    parser.add_argument(
        "--vae",
        help="decode with this AutoencoderKL (folder or hub id) instead of the pipeline's own (a fine-tuned decoder "
        "such as tools/finetune_vae_decoder.py writes; it must share the pipeline's latent space)",
    )
    add_base_check_argument(parser)
    args = parser.parse_args(argv)
    if args.control and not args.control_image:
        parser.error("--control needs --control-image")
    check_out(args.out)
    reference = check_image_prompt(args)
    conditions = read_control_images(args)

    import torch

    from visionpeft.backbones.diffusers_loading import load_pipeline, replace_vae
    from visionpeft.data.image_grid import image_grid, scale_for
    from visionpeft.errors import ConfigError
    from visionpeft.trainers.diffusion_objective import sampling_scheduler

    device = check_device(args.device)
    pipe = load_pipeline(args.model, getattr(torch, args.dtype))
    if args.vae is not None:
        replace_vae(pipe, args.vae)
    pipe = pipe.to(device)
    pipe.scheduler = sampling_scheduler(pipe.scheduler, args.prediction_type, args.zero_terminal_snr)
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    patched = getattr(pipe, "unet", None) is None  # a Flux / SD3 transformer reads 2 x 2 patches of latents
    multiple = factor * (2 if patched else 1)
    if args.size and args.size % multiple:
        what = "the VAE's factor" + (" times the transformer's 2 x 2 latent patches" if patched else "")
        raise ConfigError(
            f"--size {args.size} is not a multiple of {what} {multiple}; "
            f"try --size {max(multiple, args.size // multiple * multiple)}"
        )
    pipe.set_progress_bar_config(disable=True)
    for adapter in [*args.adapter, *args.control]:
        print(f"adapter {adapter}: {apply_adapter(pipe, adapter, not args.ignore_base_mismatch)}")
    side = args.size or default_side(pipe, patched, factor)
    inputs = control_inputs(pipe, conditions, side)
    if args.ip_adapter is not None:
        from visionpeft.trainers.ip_adapter import attach_released, reference_embeds

        loaded, encoder = attach_released(pipe, args.ip_adapter, args.ip_image_encoder, args.ip_scale)
        print(f"adapter {args.ip_adapter}: {loaded}")
        inputs[IMAGE_PROMPT] = reference_embeds(pipe, encoder, reference)
    options = {"negative_prompt": args.negative_prompt, "num_inference_steps": args.steps}
    options.update(height=side, width=side)
    if args.guidance is not None or not patched:
        options["guidance_scale"] = 7.5 if args.guidance is None else args.guidance
    if args.guidance_rescale:
        options["guidance_rescale"] = args.guidance_rescale
    options |= t5_options(pipe, args.max_sequence_length, args.true_cfg, args.negative_prompt)
    rows = [sample(pipe, prompt, args.seeds, options, inputs, args.batch_size) for prompt in args.prompt]
    grid = image_grid(rows, scale=scale_for(side), gap=GAP, margin=GAP)
    try:
        grid.save(args.out)
    except OSError as err:
        raise ConfigError(f"cannot write {args.out} ({err.strerror or err})") from None
    print(f"wrote {args.out} ({len(args.prompt)} prompts x {len(args.seeds)} seeds, {grid.size[0]}x{grid.size[1]} px)")
    return 0
