"""Loading diffusers pipelines from a local folder or the hub, failing in one line when neither works; diffusers'
entry in the library table (its model families are described by ``diffusers_models.py``)."""

from __future__ import annotations

import functools
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError
from .hub import offline_unless_reachable
from .libraries import DataConfig


def load_pipeline(name_or_path: str, torch_dtype: torch.dtype | None = None):
    """Loads any diffusers pipeline (Stable Diffusion 1.x / 2.x, DiT, ...).

    A local folder (written by ``save_pretrained``) is read directly; a hub id is looked up in the local cache
    first and downloaded only when the hub is reachable.

    Raises:
        ModelLoadError: Nothing loadable under that name, said in one line with how to point at local files.
    """
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the hub's retry chatter would bury the one line that matters
    try:
        with warnings.catch_warnings(), quiet_loading_bars():
            warnings.simplefilter("ignore", FutureWarning)  # torch_dtype vs dtype naming across versions
            return _load(name_or_path, torch_dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)


@contextmanager
def quiet_loading_bars():
    """No "Loading pipeline components" / "Loading weights" bars from diffusers and transformers while a pipeline
    loads (one bar per component on every load); both libraries' switches are restored afterwards, so sampling
    progress and a user's own settings are untouched."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    switches = [
        (lib, lib.is_progress_bar_enabled())
        for lib in (diffusers_logging, transformers_logging)
        if hasattr(lib, "is_progress_bar_enabled")
    ]
    for lib, _ in switches:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in switches:
            if enabled:
                lib.enable_progress_bar()


#: Pipeline class name prefix -> the family (``model.family``) of the personalization recipes; the first match
#: counts (SDXL's and SD3's classes also start with "StableDiffusion").
PIPELINE_FAMILIES = (
    ("StableDiffusionXL", "sdxl"),
    ("StableDiffusion3", "sd3"),
    ("StableDiffusion", "sd"),
    ("Flux", "flux"),
)

#: What each family is called in messages.
FAMILY_NAMES = {
    "sd": "Stable Diffusion 1.x / 2.x",
    "sdxl": "Stable Diffusion XL",
    "flux": "Flux",
    "sd3": "Stable Diffusion 3",
}

#: The families whose transformer reads 2 x 2 patches of latents (image sides: multiples of 2 x the VAE's scale).
PATCHED_FAMILIES = ("flux", "sd3")

#: The component holding each flow family's T5 text encoder (its tokenizer: ``tokenizer_2`` / ``tokenizer_3``).
T5_COMPONENTS = {"flux": "text_encoder_2", "sd3": "text_encoder_3"}


def missing_t5(index: dict[str, Any], family: str | None) -> str | None:
    """The T5 component a Flux / SD3 ``model_index.json`` lacks (absent or null), or None."""
    component = T5_COMPONENTS.get(family or "")
    if component is None:
        return None
    entry = index.get(component)
    return component if not isinstance(entry, list) or not entry or entry[0] is None else None


def family_of_class(class_name: str) -> str | None:
    """The family of a pipeline class name (``StableDiffusionXLPipeline`` -> ``sdxl``), or None."""
    return next((family for prefix, family in PIPELINE_FAMILIES if class_name.startswith(prefix)), None)


def pipeline_index(name_or_path: str) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """``model_index.json`` and ``vae/config.json`` (None when missing) of a pipeline in a local folder or already
    in the hub cache, read without building anything; None when neither place has it (a hub id not downloaded)."""
    import json

    path = Path(name_or_path).expanduser()

    def read(file: str) -> dict[str, Any] | None:
        if path.exists():
            found = path / file
        else:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, file) if not _looks_like_path(name_or_path) else None
            found = Path(cached) if isinstance(cached, str) else None
        try:
            return json.loads(found.read_text()) if found is not None and found.is_file() else None
        except (OSError, ValueError):
            return None

    index = read("model_index.json")
    return None if index is None else (index, read("vae/config.json"))


def load_vae(name_or_path: str, torch_dtype: torch.dtype | None = None):
    """An ``AutoencoderKL`` from a local folder or the hub (cache first), in ``torch_dtype`` (None: the file's),
    failing in one line like :func:`load_pipeline`."""
    import json

    from diffusers import AutoencoderKL

    path = Path(name_or_path).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a diffusers VAE folder (no config.json)")
    if path.exists():
        try:
            kind = json.loads((path / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            kind = "unreadable config.json"
        if kind != "AutoencoderKL":
            raise ModelLoadError(
                f"{path} holds a {kind}, not an AutoencoderKL; give a Stable Diffusion-style VAE folder"
            )
    with warnings.catch_warnings(), quiet_loading_bars():
        warnings.simplefilter("ignore", FutureWarning)
        return _load(name_or_path, torch_dtype, AutoencoderKL, "VAE")


def load_unet(name_or_path: str | Path):
    """A ``UNet2DConditionModel`` from a local folder or the hub (cache first), failing in one line like
    :func:`load_pipeline` (an ``sd_locked=false`` ControlNet export's ``unet/``)."""
    from diffusers import UNet2DConditionModel

    return _load(str(name_or_path), None, UNet2DConditionModel, "U-Net")


def replace_vae(pipeline, name_or_path: str | Path, option: str = "--vae") -> None:
    """Puts the ``AutoencoderKL`` of a folder or hub id (``option``: the argument or config key that named it) in
    the pipeline's place, in the pipeline VAE's dtype.

    Raises:
        ConfigError: Its latents are not the pipeline's (latent channels, downsampling, or the ``scaling_factor`` /
            ``shift_factor`` the pipeline divides them by differ), so its decoder cannot read what the pipeline's
            U-Net / transformer draws (nor its encoder write what they learned).
    """
    vae = load_vae(str(name_or_path), pipeline.vae.dtype)
    own = pipeline.vae.config
    if (vae.config.latent_channels, len(vae.config.block_out_channels)) != (
        own.latent_channels,
        len(own.block_out_channels),
    ):
        raise ConfigError(
            f"{option} {name_or_path}: its latents ({vae.config.latent_channels} channels, "
            f"{2 ** (len(vae.config.block_out_channels) - 1)}x downsampling) are not the pipeline's "
            f"({own.latent_channels} channels, {2 ** (len(own.block_out_channels) - 1)}x); give a VAE of this model"
        )
    scale = [(c.get("scaling_factor"), c.get("shift_factor")) for c in (vae.config, own)]
    if scale[0] != scale[1]:
        raise ConfigError(
            f"{option} {name_or_path}: its latent scale (scaling_factor, shift_factor) {scale[0]} is not the "
            f"pipeline's {scale[1]}, so the latents it decodes would be scaled wrong; give a VAE made for this model"
        )
    pipeline.vae = vae


def load_image_encoder(name_or_path: str, subfolder: str | None = None):
    """A transformers ``CLIPVisionModelWithProjection`` (an IP-Adapter's image encoder: ``h94/IP-Adapter``,
    ``models/image_encoder``) from a local folder or the hub (cache first), failing in one line like
    :func:`load_pipeline`."""
    from types import SimpleNamespace

    from transformers import CLIPVisionModelWithProjection

    path = Path(name_or_path).expanduser() / (subfolder or "")
    if Path(name_or_path).expanduser().exists() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not an image encoder folder (no config.json)")
    loader = SimpleNamespace(
        from_pretrained=functools.partial(CLIPVisionModelWithProjection.from_pretrained, subfolder=subfolder or "")
    )
    with warnings.catch_warnings(), quiet_loading_bars():
        warnings.simplefilter("ignore", FutureWarning)
        return _load(name_or_path, None, loader, "image encoder").eval()


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def dtype_keyword(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument for the installed diffusers: ``dtype`` from 0.40 on (which deprecated
    ``torch_dtype``, huggingface/diffusers#14205), ``torch_dtype`` before it (the only name older releases read)."""
    from diffusers import __version__
    from packaging.version import Version

    return {"dtype" if Version(__version__) >= Version("0.40") else "torch_dtype": dtype}


def _load(name_or_path: str, torch_dtype: torch.dtype | None, loader=None, what: str = "pipeline"):
    """``loader.from_pretrained`` (default ``DiffusionPipeline``) of a local folder, the hub cache, or the hub."""
    if loader is None:
        from diffusers import DiffusionPipeline as loader

    kwargs = dtype_keyword(torch_dtype) if torch_dtype is not None else {}
    path = Path(name_or_path).expanduser()
    if not path.exists() and _looks_like_path(name_or_path):
        raise ModelLoadError(f"{what} folder {path} does not exist")
    if path.exists():
        if what == "pipeline" and not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        try:
            return loader.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load the {what} in {path}: {_first_line(err)}") from None
    try:
        return loader.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    with offline_unless_reachable() as online:
        if not online:
            raise ModelLoadError(
                f"{what} '{name_or_path}' is not in the local cache and the hub cannot be reached; "
                "pass a local folder written by save_pretrained"
            )
        try:
            return loader.from_pretrained(name_or_path, **kwargs)
        except Exception as err:  # any hub / network failure becomes one line
            raise ModelLoadError(
                f"could not load {what} '{name_or_path}' (not cached locally, and the download failed: "
                f"{_first_line(err)}); pass a local folder written by save_pretrained"
            ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


# -- the library table's functions -------------------------------------------------------------------------------
def create(cfg: Any, num_classes: int = 0):
    """The pipeline ``cfg.name`` names (``num_classes`` is not used)."""
    return load_pipeline(cfg.name)


def data_config(model: nn.Module) -> DataConfig:
    """Images in [-1, 1], as the pipelines' VAE reads them."""
    return DataConfig((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bilinear")


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """None: a U-Net or DiT takes any multiple of its downsampling."""
    return None
