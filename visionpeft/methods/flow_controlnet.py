"""ControlNet on the flow-matching transformers (Flux, Stable Diffusion 3 / 3.5): the side tower and the transformer
call of :class:`~.controlnet.ControlNet` when it attaches to a pipeline's ``transformer`` tower.

As diffusers' ``examples/controlnet/train_controlnet_flux.py`` and ``train_controlnet_sd3.py`` (at 58eb52c):

- Flux (flux lines 556-566, 912-919): ``FluxControlNetModel.from_transformer(transformer, attention_head_dim=...,
  num_attention_heads=..., num_layers=--num_double_layers (4), num_single_layers=--num_single_layers (4))``. The
  condition image is normalised to [-1, 1] (``conditioning_image_transforms``' ``Normalize([0.5], [0.5])``, lines
  762-769), VAE-encoded (a sample of its latent distribution), shifted and scaled as the latents and packed 2 x 2
  (lines 1257-1268); the ControlNet gets the transformer call's packed latents, timestep, guidance, pooled CLIP, T5
  states and ids, and its ``controlnet_block_samples`` / ``controlnet_single_block_samples`` go to the transformer
  (lines 1306-1335).
- SD3 (sd3 lines 1040-1043, 1330-1356): ``SD3ControlNetModel.from_transformer(transformer,
  num_extra_conditioning_channels=0)`` (the script's default; ``from_transformer``'s own ``num_layers`` default 12
  kept). The condition image stays in [0, 1] (``ToTensor`` only, lines 765-771; ``StableDiffusion3ControlNetPipeline``
  normalises a PIL image to [-1, 1] but takes a tensor as it is), VAE-encoded, shifted and scaled; the ControlNet
  gets the call's latents, timestep, joint text states and pooled embedding, and its block samples go to the
  transformer as ``block_controlnet_hidden_states``. The exported config says ``force_zeros_for_pooled_projection:
  false``: the script feeds the ControlNet the pooled embedding and shifts the condition latents, and the pipeline
  does both only under that flag (diffusers issue #9686).

``from_transformer`` of SD3 writes its ``num_layers`` into the config it is given, in diffusers 0.42 the
transformer's own (which ``save_pretrained`` would then write): it gets a view of the transformer with a copy.
The condition image is encoded once per call input and batch size (the sampling steps of one image reuse it), the
batch repeated first as the pipelines repeat it (a guidance-doubled SD3 batch encodes both halves). Where the latent
sample is drawn matches the pipelines: ``FluxControlNetPipeline`` draws it from the call's generators before the
starting noise (``pipeline_flux_controlnet.py``, step 3 "Prepare control image" before step 4 "Prepare latent
variables"), so a sampler calls ``trainers.control_inputs.draw_conditions`` with its generators before the
pipeline call; ``StableDiffusion3ControlNetPipeline`` draws it from torch's global stream, as the transformer hook does.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from .control_calls import repeat_for_batch

#: ``FluxTransformer2DModel.forward``'s / ``SD3Transformer2DModel.forward``'s leading arguments, in order.
CALL_ARGUMENTS = {
    "flux": (
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "img_ids",
        "txt_ids",
        "guidance",
        "joint_attention_kwargs",
    ),
    "sd3": ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
}
#: the scripts' ControlNet depths: Flux ``--num_double_layers`` / ``--num_single_layers``, SD3 ``from_transformer``'s
DEFAULT_LAYERS = {"flux": (4, 4), "sd3": (12, 0)}
#: the diffusers control pipeline of each flow ControlNet class
FLOW_CONTROL_PIPELINES = {
    "FluxControlNetModel": "FluxControlNetPipeline",
    "SD3ControlNetModel": "StableDiffusion3ControlNetPipeline",
}
#: what the transformer call takes the ControlNet's residuals as
RESIDUAL_KEYS = {
    "flux": ("controlnet_block_samples", "controlnet_single_block_samples"),
    "sd3": ("block_controlnet_hidden_states",),
}


def build_flow_controlnet(
    transformer: nn.Module, family: str, num_layers: int | None, num_single_layers: int | None
) -> nn.Module:
    """diffusers' ControlNet of ``transformer`` through its ``from_transformer`` (see the module docstring).

    Raises:
        ConfigError: ``num_single_layers`` on SD3, or an SD3 ControlNet as deep as its transformer (its last block
            reads the text without updating it, so ``from_transformer`` cannot copy it).
    """
    from diffusers import FluxControlNetModel, SD3ControlNetModel
    from diffusers.configuration_utils import FrozenDict

    layers, single = DEFAULT_LAYERS[family]
    layers = layers if num_layers is None else num_layers
    if family == "flux":
        config = transformer.config
        return FluxControlNetModel.from_transformer(
            transformer,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
            num_layers=layers,
            num_single_layers=single if num_single_layers is None else num_single_layers,
        )
    if num_single_layers is not None:
        raise ConfigError("method.num_single_layers: an SD3 transformer has no single-stream blocks; unset it")
    if layers >= transformer.config.num_layers:
        raise ConfigError(
            f"method.num_layers={layers}: an SD3 ControlNet copies fewer blocks than the transformer's "
            f"{transformer.config.num_layers} (the last one reads the text without updating it); use at most "
            f"{transformer.config.num_layers - 1}"
        )
    parts = ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks")
    view = SimpleNamespace(config=FrozenDict(transformer.config), **{n: getattr(transformer, n) for n in parts})
    controlnet = SD3ControlNetModel.from_transformer(view, num_layers=layers, num_extra_conditioning_channels=0)
    controlnet.register_to_config(force_zeros_for_pooled_projection=False)
    return controlnet


def unbuilt_layout(class_name: str, config: dict[str, Any]) -> str | None:
    """What a ``FluxControlNetModel`` / ``SD3ControlNetModel`` config has that :func:`build_flow_controlnet` does not
    build (released ControlNets of other layouts: InstantX's Flux union and SD3 ones, SD3.5's official ones), or
    None."""
    if class_name == "FluxControlNetModel":
        if config.get("num_mode") is not None:
            return f"num_mode {config['num_mode']} (a union ControlNet reading a control mode)"
        if config.get("conditioning_embedding_channels") is not None:
            return "a pixel-space condition encoder (conditioning_embedding_channels)"
        return None
    if config.get("force_zeros_for_pooled_projection", True):
        return "force_zeros_for_pooled_projection (zero pooled text, condition latents unshifted)"
    if config.get("extra_conditioning_channels"):
        return f"{config['extra_conditioning_channels']} extra conditioning channels"
    if config.get("joint_attention_dim") is None or not config.get("use_pos_embed", True):
        return "no text input or no position embedding (SD3.5's own ControlNets)"
    return None


def normalized_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """``(latents - shift_factor) * scaling_factor``: the flow families' latent normalisation."""
    return (latents - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor


def encode_condition(vae: nn.Module, image: torch.Tensor, family: str, generator: Any = None) -> torch.Tensor:
    """The ControlNet input of condition images in [0, 1] (batch, 3, H, W): normalised as the family's script (Flux:
    [-1, 1]), a sample of the VAE's latent distribution (from ``generator``: one, or one per image; None: torch's
    global stream), shifted and scaled; Flux's packed 2 x 2."""
    pixels = image * 2 - 1 if family == "flux" else image
    with torch.no_grad():
        distribution = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        latents = normalized_latents(vae, distribution.sample(generator))
    if family != "flux":
        return latents
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


class FlowControl:
    """The ControlNet of a Flux / SD3 transformer and what a transformer call gets from it."""

    def __init__(self, transformer: nn.Module, family: str, vae: nn.Module | None, controlnet: nn.Module) -> None:
        self.transformer, self.family, self.vae, self.controlnet = transformer, family, vae, controlnet
        self._encoded: tuple[Any, int, torch.Tensor] | None = None

    def given(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The transformer call's arguments by name."""
        names = CALL_ARGUMENTS[self.family]
        return {name: args[i] if len(args) > i else kwargs.get(name) for i, name in enumerate(names)}

    def draw(self, image: Any, generator: Any, batch: int, who: str) -> None:
        """Flux: encodes ``image`` for a call of ``batch`` samples from ``generator`` (the call's, before it draws
        the starting noise, as ``FluxControlNetPipeline``); the call then finds it encoded. SD3: nothing (its
        pipeline draws the condition's sample from the global stream during the call, as the hook does)."""
        if self.family == "flux":
            self._check(image, who)
            encoded = encode_condition(self.vae, repeat_for_batch(image, batch), self.family, generator)
            self._encoded = (image, batch, encoded)

    def _check(self, image: Any, who: str) -> None:
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise DataError(f"the control image has shape {shape}; {who} needs (batch, 3, height, width) in [0, 1]")
        if self.vae is None:
            raise ConfigError(f"{who} encodes the control image with the pipeline's VAE: attach it to the pipeline")

    def condition(self, image: Any, hidden: torch.Tensor, who: str) -> torch.Tensor:
        """The encoded condition for a call on ``hidden`` (checked against it), in the ControlNet's dtype."""
        self._check(image, who)
        batch = hidden.shape[0]
        if self._encoded is None or self._encoded[0] is not image or self._encoded[1] != batch:
            encoded = encode_condition(self.vae, repeat_for_batch(image, batch), self.family)
            self._encoded = (image, batch, encoded)
        encoded = self._encoded[2]
        if encoded.shape[1:] != hidden.shape[1:]:
            raise DataError(
                f"the control image of {tuple(image.shape[-2:])} px encodes to {tuple(encoded.shape[1:])}; the "
                f"transformer's latents are {tuple(hidden.shape[1:])}: give it the size of the generated image"
            )
        return encoded.to(hidden.device, self.controlnet.dtype)

    def residuals(self, given: dict[str, Any], condition: torch.Tensor, scale: float) -> dict[str, list]:
        """The ControlNet's residuals for the call, under the transformer's keyword names (in the latents' dtype)."""
        dtype = self.controlnet.dtype
        hidden = given["hidden_states"]
        inputs = {
            "hidden_states": hidden.to(dtype),
            "controlnet_cond": condition,
            "conditioning_scale": scale,
            "encoder_hidden_states": given["encoder_hidden_states"].to(dtype),
            "pooled_projections": given["pooled_projections"].to(dtype),
            "timestep": given["timestep"],
            "return_dict": False,
        }
        if self.family == "flux":
            inputs.update({name: given[name] for name in ("img_ids", "txt_ids", "guidance", "joint_attention_kwargs")})
        outputs = self.controlnet(**inputs)
        return {
            key: [sample.to(hidden.dtype) for sample in samples]
            for key, samples in zip(RESIDUAL_KEYS[self.family], outputs)
            if samples is not None
        }
