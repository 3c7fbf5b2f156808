"""IP-Adapter (Ye et al., 2023, arXiv 2308.06721): an image prompt for a frozen text-to-image U-Net through decoupled
cross-attention.

Built with diffusers' own pieces, so what a run trains is exactly what ``pipe.load_ip_adapter`` builds: an
``ImageProjection`` (the official ``ImageProjModel``: a linear map of the frozen CLIP image encoder's ``image_embeds``
to 4 tokens of the U-Net's cross-attention width, then a LayerNorm) as a side tower, and in every cross-attention layer
an ``IPAdapterAttnProcessor2_0`` whose ``to_k_ip`` / ``to_v_ip`` attend from the layer's queries to the image tokens,
the result times ``scale`` added to the text attention's. As the official ``tutorial_train.py`` (lines 313-319),
``to_k_ip`` / ``to_v_ip`` start as copies of the layer's ``to_k`` / ``to_v``.

``variant: plus`` is IP-Adapter-plus (``tutorial_train_plus.py``): diffusers' ``IPAdapterPlusImageProjection`` (the
official ``Resampler``: 16 learned queries attend, in 4 blocks, to the image encoder's penultimate patch features) in
place of the ``ImageProjection`` (:mod:`.ip_adapter_plus`); the attention processors are the same, with 16 image
tokens. SD 1.5 with the ViT-H/14 encoder (``hidden_size`` 1280): Resampler 29,918,208 (queries 16 x 768 = 12,288;
``proj_in`` 1280 -> 768 = 983,808; 4 blocks of 7,082,496: two LayerNorms 3,072, ``to_q`` 589,824, ``to_kv``
1,179,648, ``to_out`` 589,824, feed-forward LayerNorm 1,536 + 768 -> 3072 -> 768 4,718,592; ``proj_out`` 590,592,
``norm_out`` 1,536) + ``to_k_ip`` / ``to_v_ip`` 19,169,280 = 49,087,488.

The image encoder is not part of the method: the caller runs it (the ``ip_adapter`` task, ``visionpeft generate``)
and passes its output per call, ``vp.conditioning(model, ip_image_embeds=...)``: the ``image_embeds``, (batch, dim)
or (batch, images, dim) for several reference images per sample; for plus the penultimate hidden states, (batch,
patches, dim) or (batch, images, patches, dim). A U-Net batch twice the embeddings' batch is classifier-free
guidance's: its first (unconditional) half gets zero embeddings, as diffusers' pipeline gives the plain IP-Adapter and
training drops to, or the ``negative`` of a ``(negative, positive)`` pair (diffusers gives plus the encoder's states
of a black image).

The ``diffusers`` export writes ``ip_adapter/ip_adapter.safetensors`` in the released layout (``image_proj.proj.*``,
``image_proj.norm.*``, plus: the ``Resampler``'s names, ``ip_adapter.<i>.to_k_ip.weight`` with ``i`` odd: the official
numbering of every attention processor, cross-attention ones at odd places), which ``pipe.load_ip_adapter(folder,
subfolder="ip_adapter", weight_name="ip_adapter.safetensors")`` reads (plus as plus); :meth:`IPAdapter
.load_diffusers_tensors` reads such a file back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, DataError, IncompatibleMethodError
from ..schema import setting
from .base import ExportParts, Method, MethodConfig, register_method
from .ip_adapter_plus import HEADS, build_resampler, load_released, released_options, released_tensors
from .ip_adapter_plus import NUM_TOKENS as PLUS_TOKENS

#: image tokens per reference image: the official ImageProjModel's clip_extra_context_tokens, and what diffusers'
#: loader assumes for this layout (``_convert_ip_adapter_image_proj_to_diffusers``: ``num_image_text_embeds = 4``)
NUM_TOKENS = 4
#: where the diffusers export puts the weights (``load_ip_adapter(RUN, subfolder=..., weight_name=...)``)
SUBFOLDER, WEIGHT_NAME = "ip_adapter", "ip_adapter.safetensors"


@dataclass
class IPAdapterConfig(MethodConfig):
    """IP-Adapter options.

    Attributes:
        image_embed_dim: Width of the image encoder's ``image_embeds`` (``CLIPVisionModelWithProjection``'s
            ``projection_dim``: 1024 for the ViT-H/14 encoder of ``h94/IP-Adapter`` ``models/image_encoder``), for
            plus of its hidden states (``hidden_size``: 1280); the ``ip_adapter`` task fills it in from its encoder.
        scale: Weight of the image prompt's attention (diffusers' ``set_ip_adapter_scale``); 0 is the base U-Net.
        variant: ``plain`` (``ImageProjection``) or ``plus`` (the ``Resampler`` over patch features).
        num_tokens: Image tokens per reference image: plain 4 (its layout and diffusers' loader fix it), plus the
            Resampler's queries (null: 16, ``tutorial_train_plus.py``'s ``--num_tokens``).
        resampler_width: Plus: the Resampler's width (null: the U-Net's cross-attention width, as the official
            script; the released SDXL plus files use 1280).
        resampler_heads: Plus: its 64-wide attention heads (12, the official script; released SDXL plus: 20).
    """

    image_embed_dim: int | None = setting(
        None, "width of the image encoder's image_embeds, plus: hidden states (the ip_adapter task fills it in)", min=1
    )
    scale: float = setting(1.0, "weight of the image prompt's attention (0: the base U-Net)", min=0)
    variant: str = setting(
        "plain", "plain (ImageProjection) or plus (Resampler over patch features)", choices=("plain", "plus")
    )
    num_tokens: int | None = setting(None, "image tokens per reference image (null: plain 4, plus 16)", min=1)
    resampler_width: int | None = setting(None, "plus: Resampler width (null: the cross-attention width)", min=1)
    resampler_heads: int = setting(HEADS, "plus: Resampler's 64-wide attention heads", min=1)


def _base_linear(module: nn.Module) -> nn.Module:
    """The library ``Linear`` under a wrapper another method put around it (a LoRA keeps it as ``base``)."""
    while getattr(module, "_vp_wrapper", False):
        module = module.base
    return module


@register_method
class IPAdapter(Method):
    name = "ip_adapter"
    config_class = IPAdapterConfig
    requires = {"unet": "a diffusers UNet2DConditionModel (or a Stable Diffusion pipeline's unet)"}
    task_inputs = ("image_embed_dim",)
    call_inputs = ("ip_image_embeds",)
    export_formats = frozenset({"diffusers"})  # ip_adapter/ip_adapter.safetensors: what load_ip_adapter reads

    def __init__(self, config: IPAdapterConfig, backbone) -> None:
        super().__init__(config, backbone)
        self._replaced: list[tuple[nn.Module, Any]] = []  # (Attention, its processor before)
        self.processors: dict[str, nn.Module] = {}  # diffusers' attn_processors key -> this method's processor
        self._tokens: torch.Tensor | None = None  # the image tokens of the latest U-Net call

    def build(self) -> None:
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
        from diffusers.models.embeddings import ImageProjection

        cfg = self.config
        if cfg.image_embed_dim is None:
            raise ConfigError(
                "method 'ip_adapter' needs image_embed_dim: the image encoder's projection_dim (1024 for "
                "h94/IP-Adapter's SD 1.5 encoder; the ip_adapter task fills it in)"
            )
        plus = cfg.variant == "plus"
        if not plus and (cfg.num_tokens not in (None, NUM_TOKENS) or cfg.resampler_width is not None):
            raise ConfigError(
                f"method 'ip_adapter' variant plain has {NUM_TOKENS} image tokens and no Resampler (its released "
                "layout and diffusers' loader fix them): unset num_tokens / resampler_width, or set variant: plus"
            )
        self.num_tokens = (cfg.num_tokens or PLUS_TOKENS) if plus else NUM_TOKENS
        unet = self.tower.stages["model"]
        layers = self._cross_attention_layers(unet)
        width = unet.config.cross_attention_dim
        with torch.device(unet.device):  # built where the U-Net is (a GPU, or the meta device for counting)
            if plus:
                heads, hidden = cfg.resampler_heads, cfg.resampler_width or width
                projection = build_resampler(cfg.image_embed_dim, width, hidden, heads, self.num_tokens)
            else:
                projection = ImageProjection(
                    image_embed_dim=cfg.image_embed_dim, cross_attention_dim=width, num_image_text_embeds=NUM_TOKENS
                )
        self.image_proj = self.add_tower("ip_image_proj", projection)  # fp32 whatever the U-Net: it trains
        for key, canonical, attn in layers:
            to_k, to_v = _base_linear(attn.to_k), _base_linear(attn.to_v)
            with torch.device(unet.device):
                processor = IPAdapterAttnProcessor2_0(
                    hidden_size=to_k.out_features,
                    cross_attention_dim=to_k.in_features,
                    num_tokens=[self.num_tokens],
                    scale=cfg.scale,
                ).to(to_k.weight.dtype)  # the layer's precision, as a LoRA added to it
            with torch.no_grad():
                processor.to_k_ip[0].weight.copy_(to_k.weight)
                processor.to_v_ip[0].weight.copy_(to_v.weight)
            processor._vp_owned = True
            processor.train(attn.training)
            self._replaced.append((attn, attn.processor))
            attn.set_processor(processor)
            self.processors[key] = processor
            self._register_module_tensors(f"{canonical}.{self.name}", processor)
            self.hook_input(attn, self._add_image_tokens, processor, with_kwargs=True)
        self.hook_input(unet, self._project_image, with_kwargs=True)

    def _cross_attention_layers(self, unet: nn.Module) -> list[tuple[str, str, nn.Module]]:
        """``(attn_processors key, canonical name, Attention)`` of every layer diffusers' loader gives an image
        prompt (every processor but the self-attention ``attn1`` ones), in the loader's order.

        Raises:
            IncompatibleMethodError: No such layer, one outside the backbone's transformer blocks, or one whose
                processor another IP-Adapter (diffusers' ``load_ip_adapter``) already replaced.
        """
        if getattr(unet, "encoder_hid_proj", None) is not None and unet.config.encoder_hid_dim_type == "ip_image_proj":
            raise IncompatibleMethodError(
                "ip_adapter cannot attach: the U-Net already holds an IP-Adapter loaded by diffusers "
                "(pipe.unload_ip_adapter() first)"
            )
        canonical = {
            id(block.branches["attn2"].module): f"{block.name}.attn2"
            for block in self.tower.blocks
            if "attn2" in block.branches
        }
        layers = []
        for key in unet.attn_processors:
            if key.endswith("attn1.processor"):
                continue
            attn = unet.get_submodule(key.removesuffix(".processor"))
            if id(attn) not in canonical:
                raise IncompatibleMethodError(
                    f"ip_adapter cannot attach: the attention layer {key} is not the cross-attention of a "
                    "transformer block this toolkit knows"
                )
            if isinstance(attn.processor, nn.Module):
                raise IncompatibleMethodError(
                    f"ip_adapter cannot attach: {key} already has a trained processor ({type(attn.processor).__name__})"
                )
            layers.append((key, canonical[id(attn)], attn))
        if not layers:
            raise IncompatibleMethodError("ip_adapter needs cross-attention layers; this U-Net has none")
        return layers

    def detach(self) -> None:
        for attn, original in reversed(self._replaced):
            attn.set_processor(original)
        self._replaced, self.processors, self._tokens = [], {}, None
        super().detach()

    # -- per call ---------------------------------------------------------------------------------------------
    def _embeds(self, sample: torch.Tensor) -> torch.Tensor:
        """This call's image embeddings as (U-Net batch, images, ...): as given, or with zeros (or a given negative)
        before them for the unconditional half of a batch that classifier-free guidance doubled."""
        given = self.call_input("ip_image_embeds")
        negative, embeds = given if isinstance(given, tuple) and len(given) == 2 else (None, given)
        embeds, negative = self._checked(embeds), None if negative is None else self._checked(negative)
        batch = sample.shape[0]
        if embeds.shape[0] * 2 == batch:
            embeds = torch.cat([torch.zeros_like(embeds) if negative is None else negative.expand_as(embeds), embeds])
        elif embeds.shape[0] != batch:
            raise DataError(
                f"{embeds.shape[0]} image embeddings for a U-Net batch of {batch}; give one per sample (or one per "
                "prompt when classifier-free guidance doubles the batch)"
            )
        return embeds.to(device=sample.device)

    def _checked(self, embeds: Any) -> torch.Tensor:
        """Embeddings of the variant's shape, with the images axis added when there is none."""
        dim, plus = self.config.image_embed_dim, self.config.variant == "plus"
        least = 3 if plus else 2
        if not isinstance(embeds, torch.Tensor) or embeds.ndim not in (least, least + 1) or embeds.shape[-1] != dim:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            each = f"patches, {dim}" if plus else str(dim)
            raise DataError(
                f"the ip_image_embeds have shape {shape}; this IP-Adapter needs (batch, {each}) or (batch, images, "
                f"{each}): the image encoder's {'penultimate hidden states' if plus else 'image_embeds'}"
            )
        return embeds[:, None] if embeds.ndim == least else embeds

    def _project_image(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        embeds = self._embeds(sample)
        batch, images = embeds.shape[:2]
        tokens = self.image_proj(embeds.flatten(0, 1))  # (batch * images, tokens, width), diffusers' per-image order
        # kept until the next call: a gradient-checkpointed block runs its attention again during the backward pass
        self._tokens = tokens.reshape(batch, images * self.num_tokens, tokens.shape[-1])

    def _add_image_tokens(
        self, processor: nn.Module, module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict]:
        tokens = self._tokens.to(processor.to_k_ip[0].weight.dtype)
        if len(args) > 1:  # Attention.forward(hidden_states, encoder_hidden_states, ...)
            return (args[0], (args[1], [tokens]), *args[2:]), kwargs
        # diffusers' form of an image prompt: (text states, [image tokens])
        return args, {**kwargs, "encoder_hidden_states": (kwargs.get("encoder_hidden_states"), [tokens])}

    # -- export ------------------------------------------------------------------------------------------------
    def export_parts(self, format: str) -> ExportParts:
        return ExportParts(files={f"{SUBFOLDER}/{WEIGHT_NAME}": self.diffusers_tensors()})

    def _numbered(self) -> dict[int, nn.Module]:
        """The official index of each processor: its place among all the U-Net's attention processors (self-
        attention ones at even places), as diffusers' ``_convert_ip_adapter_attn_to_diffusers`` counts them."""
        return {1 + 2 * i: processor for i, processor in enumerate(self.processors.values())}

    def diffusers_tensors(self) -> dict[str, torch.Tensor]:
        """The weights in the released IP-Adapter layout (``image_proj.proj.weight``, plus: ``image_proj.latents``,
        ``image_proj.layers.0.0.to_kv.weight``, ...; ``ip_adapter.1.to_k_ip.weight``, ...), the keys
        ``pipe.load_ip_adapter`` reads from a safetensors file."""
        proj = self.image_proj
        if self.config.variant == "plus":
            tensors = {f"image_proj.{key}": value for key, value in released_tensors(proj).items()}
        else:
            tensors = {
                "image_proj.proj.weight": proj.image_embeds.weight,
                "image_proj.proj.bias": proj.image_embeds.bias,
                "image_proj.norm.weight": proj.norm.weight,
                "image_proj.norm.bias": proj.norm.bias,
            }
        for index, processor in self._numbered().items():
            tensors[f"ip_adapter.{index}.to_k_ip.weight"] = processor.to_k_ip[0].weight
            tensors[f"ip_adapter.{index}.to_v_ip.weight"] = processor.to_v_ip[0].weight
        return {key: value.detach() for key, value in tensors.items()}

    def load_diffusers_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Takes weights in the released layout (:meth:`diffusers_tensors`; an ``ip-adapter_sd15.safetensors``)
        into the attached method.

        Raises:
            CheckpointError: Keys missing or left over, or shapes of another U-Net or image encoder.
        """
        ours = self.diffusers_tensors()
        missing, unexpected = sorted(set(ours) - set(tensors)), sorted(set(tensors) - set(ours))
        if missing or unexpected:
            what = f"lacks {missing[0]}" if missing else f"holds {unexpected[0]}, which this U-Net has no place for"
            raise CheckpointError(
                f"{source} {what} ({len(missing)} missing, {len(unexpected)} unexpected keys): not an IP-Adapter "
                "for this U-Net"
            )
        for key, value in ours.items():
            if tuple(tensors[key].shape) != tuple(value.shape):
                raise CheckpointError(
                    f"{source}: {key} has shape {tuple(tensors[key].shape)}, this U-Net's IP-Adapter "
                    f"{tuple(value.shape)}"
                )
        if self.config.variant == "plus":  # to_kv is fused in the file: split into the projection's to_k / to_v
            load_released(self.image_proj, {k.removeprefix("image_proj."): v for k, v in tensors.items()})
            ours = {key: value for key, value in ours.items() if not key.startswith("image_proj.")}
        with torch.no_grad():
            for key, value in ours.items():
                value.copy_(tensors[key])


def released_layout_options(tensors: dict[str, torch.Tensor]) -> dict[str, int | str]:
    """The options of an IP-Adapter holding ``tensors`` (the released layout) and the cross-attention width it was
    trained for: ``{"image_embed_dim": ..., "cross_attention_dim": ...}`` (plus: ``variant``, ``num_tokens``,
    ``resampler_width``, ``resampler_heads`` too).

    Raises:
        CheckpointError: Neither a plain ``image_proj.proj.weight`` nor a plus ``Resampler`` (another kind of
            IP-Adapter: full-face, FaceID).
    """
    plus = released_options(tensors)
    if plus is not None:
        return plus
    weight = tensors.get("image_proj.proj.weight")
    if weight is None or weight.ndim != 2 or weight.shape[0] % NUM_TOKENS:
        raise CheckpointError(
            "the file holds neither the plain IP-Adapter's image_proj.proj.weight nor the plus Resampler's "
            "image_proj.latents (a full-face / FaceID IP-Adapter is not supported)"
        )
    return {"image_embed_dim": int(weight.shape[1]), "cross_attention_dim": int(weight.shape[0] // NUM_TOKENS)}
