"""T2I-Adapter (Mou et al., AAAI 2024): a small convolutional network that turns a condition image (depth, edges,
pose, colour) into one feature map per U-Net down block, added inside the frozen U-Net's encoder.

Built with diffusers' own ``T2IAdapter`` (``full_adapter`` for SD 1.x / 2.x, or the smaller ``light_adapter``), so
what a run trains is exactly the module ``StableDiffusionAdapterPipeline`` loads. The adapter is a side tower of the
adapted model; each U-Net call made inside ``vp.conditioning(model, control_image=...)`` runs it on that call's
condition image and passes its states, times ``conditioning_scale``, as ``down_intrablock_additional_residuals``
(added to states another control gave): a cross-attention down block adds its state after its last attention layer,
a plain down block after the block. The adapter does not see the timestep, so a pipeline would compute its states
once per image; here they are recomputed at each U-Net call, which keeps one path for training and sampling.
The ``diffusers`` export writes the adapter as a ``t2i_adapter/`` folder (``save_pretrained``) that
``T2IAdapter.from_pretrained`` reads.
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
from .controlnet import add_to_call, fit_control_image


@dataclass
class T2IAdapterConfig(MethodConfig):
    """T2I-Adapter options; defaults are diffusers' ``T2IAdapter`` for Stable Diffusion 1.x / 2.x.

    Attributes:
        adapter_type: ``full_adapter`` (the released SD 1.x depth / pose / sketch adapters) or ``light_adapter``
            (the released colour adapter: blocks at a quarter width, one more block that repeats the last width).
        channels: diffusers' ``channels``: the widths of the adapter's blocks. None fits the U-Net: its
            ``block_out_channels`` (``light_adapter``: all but the last, which its extra block repeats).
        num_res_blocks: Residual blocks per adapter block (the released light adapters use 4).
        downscale_factor: The pixel unshuffle that brings the condition image onto the latent grid; must equal the
            VAE's scale factor (8 for Stable Diffusion).
        in_channels: Channels of the condition image (1 for grey-scale edges or sketches).
        conditioning_scale: Multiplier of the adapter's states (``adapter_conditioning_scale``).
    """

    adapter_type: str = setting("full_adapter", "diffusers' adapter type", choices=("full_adapter", "light_adapter"))
    channels: tuple[int, ...] | None = setting(
        None, "adapter block widths; null: the U-Net's block_out_channels", nonempty=True
    )
    num_res_blocks: int = setting(2, "residual blocks per adapter block", min=1)
    downscale_factor: int = setting(8, "pixel unshuffle factor = the VAE's scale factor (8 for SD)", min=1)
    in_channels: int = setting(3, "channels of the condition image", min=1)
    conditioning_scale: float = setting(1.0, "multiplier of the adapter's states", min=0)


def _down_block_widths(unet: nn.Module) -> tuple[int, ...]:
    """The width of the state each of the U-Net's down blocks takes, after checking that each takes it at the
    resolution a full or light adapter gives it (the block's input resolution, halved once per block before it).

    Raises:
        IncompatibleMethodError: A block takes no state, or takes it after downsampling (an SDXL layout).
    """
    for i, block in enumerate(unet.down_blocks):
        kind = type(block).__name__
        if getattr(block, "has_cross_attention", False):
            if "additional_residuals" not in inspect.signature(block.forward).parameters:
                raise IncompatibleMethodError(
                    f"t2i_adapter cannot feed the U-Net's down block {i} ({kind}): it takes no additional_residuals"
                )
        elif getattr(block, "downsamplers", None) is not None:
            raise IncompatibleMethodError(
                f"t2i_adapter cannot feed the U-Net's down block {i} ({kind}): the U-Net adds its state after the "
                "block's downsampler (an SDXL layout, diffusers' full_adapter_xl), at half the resolution "
                "full_adapter / light_adapter give"
            )
    return tuple(unet.config.block_out_channels)


@register_method
class T2IAdapterMethod(Method):
    name = "t2i_adapter"
    config_class = T2IAdapterConfig
    requires = {"unet": "a diffusers UNet2DConditionModel (or a Stable Diffusion pipeline's unet)"}
    call_inputs = ("control_image",)
    export_formats = frozenset({"diffusers"})  # t2i_adapter/: what T2IAdapter.from_pretrained reads
    diffusers_folder_class = "T2IAdapter"  # ... and such a folder (this toolkit's or a released one) reads back

    def export_parts(self, format: str) -> ExportParts:
        return ExportParts(models={"t2i_adapter": lambda: self.adapter})

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
        needed = _down_block_widths(unet)
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
            raise IncompatibleMethodError(
                f"t2i_adapter ({cfg.adapter_type}, channels={list(channels)}) gives states of widths {list(given)}; "
                f"the U-Net's {len(needed)} down blocks take {list(needed)} (one per block, its block_out_channels)"
                + ("; light_adapter repeats its last width" if light else "")
            )
        with torch.device(unet.device):  # built where the U-Net is (a GPU, or the meta device for counting)
            adapter = T2IAdapter(
                in_channels=cfg.in_channels,
                channels=list(channels),
                num_res_blocks=cfg.num_res_blocks,
                downscale_factor=cfg.downscale_factor,
                adapter_type=cfg.adapter_type,
            )
        self.adapter = self.add_tower("t2i_adapter", adapter)  # fp32 whatever the U-Net: it trains
        self.hook_input(unet, self._add_states, with_kwargs=True)

    def _control_image(self, sample: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        who = f"this T2I-Adapter (its pixel unshuffle downscales by {cfg.downscale_factor})"
        image = self.call_input("control_image")
        return fit_control_image(image, sample, cfg.downscale_factor, cfg.in_channels, self.adapter.dtype, who)

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
        return args, add_to_call(kwargs, "down_intrablock_additional_residuals", states, self.name)
