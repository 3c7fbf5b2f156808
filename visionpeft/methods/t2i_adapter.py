"""T2I-Adapter (Mou et al., AAAI 2024): a small convolutional network that turns a condition image (depth, edges,
pose, colour) into one feature map per U-Net down block, added inside the frozen U-Net's encoder.

Built with diffusers' own ``T2IAdapter`` (``full_adapter`` for SD 1.x / 2.x, or the smaller ``light_adapter``;
``full_adapter_xl`` for SDXL, as ``train_t2i_adapter_sdxl.py`` builds it, lines 886-892), so what a run trains is
exactly the module ``StableDiffusionAdapterPipeline`` / ``StableDiffusionXLAdapterPipeline`` loads. The adapter is a
side tower of the adapted model; each U-Net call made inside ``vp.conditioning(model, control_image=...)`` runs it on
that call's condition image and passes its states, times ``conditioning_scale``, as
``down_intrablock_additional_residuals`` (added to states another control gave): a cross-attention down block adds
its state after its last attention layer, a plain down block after the block (SDXL's first block: after its
downsampler; the fourth state of ``full_adapter_xl`` goes to the mid block's output). The adapter does not see the
timestep, so a pipeline would compute its states once per image; here they are recomputed at each U-Net call, which
keeps one path for training and sampling. The ``diffusers`` export writes the adapter as a ``t2i_adapter/`` folder
(``save_pretrained``) that ``T2IAdapter.from_pretrained`` reads.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, IncompatibleMethodError
from ..schema import setting
from .base import ExportParts, Method, MethodConfig, register_method
from .control_calls import add_to_call, fit_control_image


@dataclass
class T2IAdapterConfig(MethodConfig):
    """T2I-Adapter options; defaults are diffusers' ``T2IAdapter`` for Stable Diffusion 1.x / 2.x.

    Attributes:
        adapter_type: ``full_adapter`` (the released SD 1.x depth / pose / sketch adapters), ``light_adapter``
            (the released colour adapter: blocks at a quarter width, one more block that repeats the last width) or
            ``full_adapter_xl`` (SDXL's layout: one state per down block and one for the mid block; only its third
            block halves the resolution).
        channels: diffusers' ``channels``: the widths of the adapter's blocks. None fits the U-Net: its
            ``block_out_channels`` (``light_adapter``: all but the last, which its extra block repeats;
            ``full_adapter_xl``: the last repeated for the mid block, SDXL's (320, 640, 1280, 1280)).
        num_res_blocks: Residual blocks per adapter block (the released light adapters use 4).
        downscale_factor: The pixel unshuffle that brings the condition image onto the grid of the first state:
            the VAE's scale factor (8 for Stable Diffusion), twice it for ``full_adapter_xl`` (16 for SDXL, whose
            first state lands after the first down block's downsampler). None: 8, or 16 for ``full_adapter_xl``.
        in_channels: Channels of the condition image (1 for grey-scale edges or sketches).
        conditioning_scale: Multiplier of the adapter's states (``adapter_conditioning_scale``).
    """

    adapter_type: str = setting(
        "full_adapter", "diffusers' adapter type", choices=("full_adapter", "light_adapter", "full_adapter_xl")
    )
    channels: tuple[int, ...] | None = setting(
        None, "adapter block widths; null: the U-Net's block_out_channels", nonempty=True
    )
    num_res_blocks: int = setting(2, "residual blocks per adapter block", min=1)
    downscale_factor: int | None = setting(
        None, "pixel unshuffle factor (null: 8, the VAE's factor; 16 for full_adapter_xl)", min=1
    )
    in_channels: int = setting(3, "channels of the condition image", min=1)
    conditioning_scale: float = setting(1.0, "multiplier of the adapter's states", min=0)


#: The default pixel unshuffle of each adapter type (SD's VAE factor 8; SDXL's first state sits one halving lower).
DEFAULT_DOWNSCALE = {"full_adapter": 8, "light_adapter": 8, "full_adapter_xl": 16}


def _down_block_widths(unet: nn.Module) -> tuple[int, ...]:
    """The width of the state each of the U-Net's down blocks takes, after checking that each takes it at the
    resolution a full or light adapter gives it (the block's input resolution, halved once per block before it).

    Raises:
        IncompatibleMethodError: A block takes no state, or takes it after downsampling (an SDXL layout).
    """
    for i, block in enumerate(unet.down_blocks):
        kind = type(block).__name__
        if getattr(block, "has_cross_attention", False):
            _check_takes_residuals(block, i)
        elif getattr(block, "downsamplers", None) is not None:
            raise IncompatibleMethodError(
                f"t2i_adapter cannot feed the U-Net's down block {i} ({kind}): the U-Net adds its state after the "
                "block's downsampler (an SDXL layout, diffusers' full_adapter_xl), at half the resolution "
                "full_adapter / light_adapter give; use adapter_type=full_adapter_xl"
            )
    return tuple(unet.config.block_out_channels)


def _check_takes_residuals(block: nn.Module, index: int) -> None:
    if "additional_residuals" not in inspect.signature(block.forward).parameters:
        raise IncompatibleMethodError(
            f"t2i_adapter cannot feed the U-Net's down block {index} ({type(block).__name__}): it takes no "
            "additional_residuals"
        )


def _xl_widths(unet: nn.Module) -> tuple[int, ...]:
    """The widths of the four states ``full_adapter_xl`` gives, after checking the U-Net has SDXL's layout, the one
    diffusers' ``FullAdapterXL`` fits: a plain first down block with a downsampler (its state added after it), a
    cross-attention block with a downsampler, a last cross-attention block, then the mid block (the fourth state,
    at the last block's resolution).

    Raises:
        IncompatibleMethodError: Another layout.
    """
    blocks = list(unet.down_blocks)
    cross = [bool(getattr(b, "has_cross_attention", False)) for b in blocks]
    down = [getattr(b, "downsamplers", None) is not None for b in blocks]
    if len(blocks) != 3 or cross != [False, True, True] or down != [True, True, False]:
        kinds = ", ".join(type(b).__name__ for b in blocks)
        raise IncompatibleMethodError(
            f"t2i_adapter full_adapter_xl fits SDXL's U-Net layout (3 down blocks: DownBlock2D, CrossAttnDownBlock2D, "
            f"CrossAttnDownBlock2D); this U-Net's down blocks are {kinds}: use full_adapter or light_adapter"
        )
    for i in (1, 2):
        _check_takes_residuals(blocks[i], i)
    widths = tuple(unet.config.block_out_channels)
    return (*widths, widths[-1])


@register_method
class T2IAdapterMethod(Method):
    name = "t2i_adapter"
    config_class = T2IAdapterConfig
    requires = {"unet": "a diffusers UNet2DConditionModel (or a Stable Diffusion pipeline's unet)"}
    call_inputs = ("control_image",)
    several = True  # each adapter its own tower (t2i_adapter, t2i_adapter_1, ...) and condition image
    export_formats = frozenset({"diffusers"})  # t2i_adapter/: what T2IAdapter.from_pretrained reads
    diffusers_folder_class = "T2IAdapter"  # ... and such a folder (this toolkit's or a released one) reads back

    def export_parts(self, format: str) -> ExportParts:
        return ExportParts(models={self.tower_name: lambda: self.adapter})

    @classmethod
    def options_from_folder(cls, folder_config: dict[str, Any]) -> dict[str, Any]:
        """The options of an adapter shaped as the ``T2IAdapter`` whose config is ``folder_config``."""
        keys = ("adapter_type", "channels", "num_res_blocks", "downscale_factor", "in_channels")
        return {key: folder_config[key] for key in keys if key in folder_config}

    def load_folder_model(self, model: nn.Module) -> None:
        """Takes the weights of a ``T2IAdapter`` read from a folder into the attached adapter."""
        self.adapter.load_state_dict(model.state_dict())

    def build(self) -> None:
        from diffusers import T2IAdapter

        cfg = self.config
        unet = self.tower.stages["model"]
        xl = cfg.adapter_type == "full_adapter_xl"
        needed = _xl_widths(unet) if xl else _down_block_widths(unet)
        light = cfg.adapter_type == "light_adapter"
        channels = tuple(cfg.channels) if cfg.channels is not None else (needed[:-1] if light else needed)
        least = 4 if light else 1  # a light block works at a quarter of its width
        if not channels or min(channels) < least:
            raise ConfigError(
                f"method 't2i_adapter' option 'channels' must be widths of at least {least} for "
                f"{cfg.adapter_type}, got {list(channels)}"
            )
        given = (*channels, channels[-1]) if light else channels
        if given != needed:
            takes = (
                f"the U-Net's {len(needed) - 1} down blocks and its mid block take {list(needed)}"
                if xl
                else f"the U-Net's {len(needed)} down blocks take {list(needed)} (one per block: block_out_channels)"
            )
            raise IncompatibleMethodError(
                f"t2i_adapter ({cfg.adapter_type}, channels={list(channels)}) gives states of widths {list(given)}; "
                + takes
                + ("; light_adapter repeats its last width" if light else "")
            )
        self.downscale_factor = cfg.downscale_factor or DEFAULT_DOWNSCALE[cfg.adapter_type]
        with torch.device(unet.device):  # built where the U-Net is (a GPU, or the meta device for counting)
            adapter = T2IAdapter(
                in_channels=cfg.in_channels,
                channels=list(channels),
                num_res_blocks=cfg.num_res_blocks,
                downscale_factor=self.downscale_factor,
                adapter_type=cfg.adapter_type,
            )
        self.tower_name = self.free_tower_name("t2i_adapter")  # a second adapter's: t2i_adapter_1
        self.adapter = self.add_tower(self.tower_name, adapter)  # fp32 whatever the U-Net: it trains
        self.hook_input(unet, self._add_states, with_kwargs=True)

    def _control_image(self, sample: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        # the first state's grid: the latents' own (full / light), or half of them (full_adapter_xl)
        factor = self.downscale_factor // (2 if cfg.adapter_type == "full_adapter_xl" else 1)
        who = f"this T2I-Adapter (its pixel unshuffle downscales by {self.downscale_factor})"
        image = self.call_input("control_image")
        return fit_control_image(image, sample, factor, cfg.in_channels, self.adapter.dtype, who)

    def _states(self, sample: torch.Tensor) -> list[torch.Tensor]:
        """The adapter's states for this call. They depend on the condition image alone, so while nothing trains
        (sampling: every denoising step passes the same image) they are computed once per image, as diffusers'
        adapter pipeline does, instead of once per U-Net call."""
        image = self.call_input("control_image")
        key = (image._version, tuple(sample.shape))  # the cache holds the image itself: its id cannot be reused
        cached = getattr(self, "_cached", None)
        if not torch.is_grad_enabled() and cached is not None and cached[0] is image and cached[1] == key:
            return cached[2]
        states = self.adapter(self._control_image(sample))
        self._cached = (image, key, states) if not torch.is_grad_enabled() else None
        return states

    def _add_states(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        sample = args[0] if args else kwargs["sample"]
        scale = self.config.conditioning_scale
        states = [(state * scale).to(sample.dtype) for state in self._states(sample)]
        return args, add_to_call(kwargs, "down_intrablock_additional_residuals", states, self.key)
