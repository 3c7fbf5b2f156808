"""ControlNet (Zhang et al., ICCV 2023): a trainable copy of the U-Net's encoder, fed a condition image through a small
hint encoder, whose zero-initialised 1x1 convolutions add residuals to the frozen U-Net's skip connections.

Built with diffusers' own ``ControlNetModel.from_unet`` (encoder and mid block copied from the U-Net, hint encoder
with ``conditioning_embedding_out_channels``, zero convs per down-block residual and for the mid block), so what a
run trains is exactly the module ``StableDiffusionControlNetPipeline`` loads. The ControlNet is a side tower of the
adapted model; each U-Net call made inside ``vp.conditioning(model, control_image=...)`` runs it on that call's
noisy latents, timestep and text states and passes its residuals to the U-Net (added to any another control gave).
On SDXL ``from_unet`` keeps the U-Net's ``text_time`` add-embedding, and the ControlNet gets the call's added
conditions (``added_cond_kwargs``: pooled ``text_embeds`` + ``time_ids``), as ``train_controlnet_sdxl.py`` passes
them (lines 1253-1261) and ``StableDiffusionXLControlNetPipeline`` does. On a Flux or SD3 pipeline's ``transformer``
it is ``FluxControlNetModel`` / ``SD3ControlNetModel`` built with ``from_transformer``, reading the VAE's latents of
the condition image (:mod:`.flow_controlnet`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..schema import setting
from .base import ExportParts, Method, MethodConfig, named_base_parameters, register_method
from .control_calls import add_to_call, fit_control_image
from .flow_controlnet import FLOW_CONTROL_PIPELINES, unbuilt_layout
from .library_layers import library_layers

#: ``UNet2DConditionModel.forward``'s leading arguments, in order (a call may pass any of them by position).
UNET_ARGUMENTS = (
    "sample",
    "timestep",
    "encoder_hidden_states",
    "class_labels",
    "timestep_cond",
    "attention_mask",
    "cross_attention_kwargs",
    "added_cond_kwargs",
)

#: The U-Net parts ``sd_locked=False`` trains: the official code's ``output_blocks`` and ``out`` in diffusers' names.
DECODER_PARTS = ("up_blocks", "conv_norm_out", "conv_out")
#: The U-Net attribute naming the ControlNet that unlocked its decoder.
UNLOCKED_BY = "_vp_decoder_unlocked_by"


def _in_dtype(conditions: dict[str, torch.Tensor] | None, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """SDXL's added conditions (``text_embeds``, ``time_ids``) for the ControlNet, in its dtype."""
    return None if conditions is None else {key: value.to(dtype) for key, value in conditions.items()}


@dataclass
class ControlNetConfig(MethodConfig):
    """ControlNet options; defaults are diffusers' (``ControlNetModel``, ``train_controlnet.py``).

    Attributes:
        conditioning_scale: Multiplier of the residuals (``controlnet_conditioning_scale``).
        guess_mode: diffusers' guess mode (residuals scaled from 0.1 to 1.0 from the shallowest block to the mid).
        conditioning_channels: Channels of the condition image.
        hint_channels: Widths of the hint encoder's stages; its downsampling (2 ** (stages - 1)) must equal the VAE's
            scale factor (8 for Stable Diffusion: four stages), so the hint lands on the latent grid.
        num_layers: On a Flux / SD3 transformer, the blocks its ControlNet copies (Flux: double-stream).
        num_single_layers: On a Flux transformer, the single-stream blocks its ControlNet copies.
        sd_locked: False also trains the U-Net's decoder in place (diffusers' ``up_blocks``, ``conv_norm_out`` and
            ``conv_out``: the official code's ``sd_locked=False``, which adds ``output_blocks`` and ``out`` to the
            optimizer, ``cldm/cldm.py`` ``configure_optimizers``). Its ``docs/train.md`` ("Other options") calls it
            dangerous on data that is not good enough, suggests a lower learning rate (2e-6 for SD 1.5 against
            1e-5) and ending a long run with a few thousand steps so unlocked. The ``diffusers`` export then writes
            the trained U-Net beside the ControlNet (``unet/``).
    """

    conditioning_scale: float = setting(1.0, "multiplier of the ControlNet residuals", min=0)
    guess_mode: bool = setting(False, "diffusers' guess mode (residual scales 0.1 ... 1.0)")
    conditioning_channels: int = setting(3, "channels of the condition image", min=1)
    hint_channels: tuple[int, ...] = setting(
        (16, 32, 96, 256), "hint encoder widths (4 stages: x8 down)", nonempty=True
    )
    num_layers: int | None = setting(
        None,
        "Flux / SD3 only: transformer blocks the ControlNet copies (Flux double-stream; null: the scripts' 4 / 12)",
        min=1,
    )
    num_single_layers: int | None = setting(
        None, "Flux only: single-stream blocks the ControlNet copies (null: the script's 4)", min=0
    )
    sd_locked: bool = setting(
        True,
        "false: the U-Net's decoder (up blocks, output norm and conv) trains too, the official sd_locked=False "
        "(a lower lr; the export adds unet/)",
    )


@register_method
class ControlNet(Method):
    name = "controlnet"
    config_class = ControlNetConfig
    requires = {"unet": "a diffusers UNet2DConditionModel or a Flux / SD3 transformer (or a pipeline holding one)"}
    call_inputs = ("control_image",)
    several = True  # each ControlNet its own tower (controlnet, controlnet_1, ...) and condition image
    export_formats = frozenset({"diffusers"})  # controlnet/: what (Flux / SD3)ControlNetModel.from_pretrained reads
    # ... and such a folder (this toolkit's or a released one) reads back
    diffusers_folder_class = ("ControlNetModel", "FluxControlNetModel", "SD3ControlNetModel")

    def check_fits(self) -> None:
        """A U-Net, or a Flux / SD3 transformer; a subclass with its own ``build`` (one that reshapes the U-Net
        ControlNet, as ``controlnet_lora``) stays on U-Nets."""
        if type(self).build is not ControlNet.build or "flow_transformer" not in self.tower.capabilities:
            super().check_fits()

    def build(self) -> None:
        from diffusers import ControlNetModel

        cfg = self.config
        if "flow_transformer" in self.tower.capabilities:
            self._build_flow()
            return
        if cfg.num_layers is not None or cfg.num_single_layers is not None:
            raise ConfigError("method.num_layers / num_single_layers are for Flux / SD3 transformers; unset them")
        unet = self.tower.stages["model"]
        # built where the U-Net is (a GPU, or the meta device for counting), from its base weights (whatever LoRA)
        with torch.device(unet.device), library_layers(unet):
            controlnet = ControlNetModel.from_unet(
                unet,
                conditioning_embedding_out_channels=tuple(cfg.hint_channels),
                conditioning_channels=cfg.conditioning_channels,
            )
        self.tower_name = self.free_tower_name("controlnet")  # a second ControlNet's: controlnet_1
        self.controlnet = self.add_tower(self.tower_name, controlnet)  # fp32 whatever the U-Net: it trains
        self.factor = 2 ** (len(cfg.hint_channels) - 1)
        self.hook_input(unet, self._add_residuals, with_kwargs=True)
        if not cfg.sd_locked:
            self._unlock_decoder(unet)

    def _unlock_decoder(self, unet: nn.Module) -> None:
        """``sd_locked=False``: the U-Net's decoder parameters train in place (restored on detach); one ControlNet
        per U-Net may unlock it (two would train, restore and export the same tensors twice)."""
        holder = getattr(unet, UNLOCKED_BY, None)
        if holder is not None:
            raise ConfigError(
                f"{holder} already unlocks this U-Net's decoder; give sd_locked=false to one ControlNet only"
            )
        setattr(unet, UNLOCKED_BY, self.key)
        self._unlocked = unet
        decoder = {id(p) for part in DECODER_PARTS for p in getattr(unet, part).parameters()}
        for name, owner, attr in self.tower_parameters():
            if id(getattr(owner, attr)) in decoder:
                self.train_in_place(name, owner, attr)

    def _build_flow(self) -> None:
        """The Flux / SD3 ControlNet (:mod:`.flow_controlnet`): no hint encoder, the VAE encodes the condition."""
        from ..backbones.diffusers_flow import flow_family
        from .flow_controlnet import FlowControl, build_flow_controlnet

        cfg = self.config
        defaults = ControlNetConfig()
        if not cfg.sd_locked:
            raise ConfigError(
                "method.sd_locked=false unlocks a U-Net's decoder (its up blocks); a Flux / SD3 transformer has none"
            )
        if cfg.guess_mode or tuple(cfg.hint_channels) != defaults.hint_channels or cfg.conditioning_channels != 3:
            raise ConfigError(
                "method.guess_mode / hint_channels / conditioning_channels are for U-Net ControlNets: a Flux / SD3 "
                "ControlNet reads the VAE's latents of an RGB condition image; unset them"
            )
        transformer = self.tower.stages["model"]
        family = flow_family(transformer)
        with torch.device(transformer.device), library_layers(transformer):
            built = build_flow_controlnet(transformer, family, cfg.num_layers, cfg.num_single_layers)
        self.tower_name = self.free_tower_name("controlnet")
        self.controlnet = self.add_tower(self.tower_name, built)
        self.flow = FlowControl(transformer, family, self.backbone.latent_encoder(), self.controlnet)
        self.hook_input(transformer, self._add_flow_residuals, with_kwargs=True)

    def detach(self) -> None:
        unlocked = getattr(self, "_unlocked", None)
        if unlocked is not None:
            delattr(unlocked, UNLOCKED_BY)
            self._unlocked = None
        super().detach()

    @property
    def exports_base_weights(self) -> bool:
        return not self.config.sd_locked  # unet/

    def export_parts(self, format: str) -> ExportParts:
        models = {self.tower_name: self.diffusers_controlnet}
        if not self.config.sd_locked:
            models["unet"] = self.diffusers_unet
        return ExportParts(models=models)

    def diffusers_unet(self) -> nn.Module:
        """With ``sd_locked=False``: the U-Net with its trained decoder as a plain ``UNet2DConditionModel`` (its own
        weights only: another method's layers on it are left out, they export on their own)."""
        unet = self.tower.stages["model"]
        plain = type(unet).from_config(unet.config)  # fp32, whatever precision the frozen part is stored in
        plain.load_state_dict({name: getattr(owner, attr) for name, owner, attr in named_base_parameters(unet)})
        return plain

    @classmethod
    def options_from_folder(cls, folder_config: dict[str, Any]) -> dict[str, Any]:
        """The options of a ControlNet shaped as the ``ControlNetModel`` / ``FluxControlNetModel`` /
        ``SD3ControlNetModel`` whose config is ``folder_config`` (a Flux / SD3 one: its depth, as the pipeline's
        transformer builds it; :mod:`.flow_controlnet`).

        Raises:
            CheckpointError: A Flux / SD3 ControlNet of a layout this method does not build (see
                :func:`~.flow_controlnet.unbuilt_layout`).
        """
        class_name = folder_config.get("_class_name", "ControlNetModel")
        if class_name == "ControlNetModel":
            return {
                "hint_channels": folder_config["conditioning_embedding_out_channels"],
                "conditioning_channels": folder_config.get("conditioning_channels", 3),
            }
        unbuilt = unbuilt_layout(class_name, folder_config)
        if unbuilt is not None:
            raise CheckpointError(
                f"this {class_name} has {unbuilt}, which visionpeft's {class_name.removesuffix('Model')} does not "
                f"build; load it in diffusers' {FLOW_CONTROL_PIPELINES[class_name]}"
            )
        options = {"num_layers": folder_config["num_layers"]}
        if class_name == "FluxControlNetModel":
            options["num_single_layers"] = folder_config["num_single_layers"]
        return options

    def load_folder_model(self, model: nn.Module) -> None:
        """Takes the weights of a ``ControlNetModel`` (Flux / SD3: ``FluxControlNetModel`` / ``SD3ControlNetModel``)
        read from a folder into the attached ControlNet.

        Raises:
            CheckpointError: The folder's ControlNet was built for a denoiser of other shapes.
        """
        ours, theirs = self.controlnet.state_dict(), model.state_dict()
        differ = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape]
        differ += [k for k in theirs if k not in ours]
        if differ:
            raise CheckpointError(
                f"the {type(model).__name__} folder does not fit the {type(self.controlnet).__name__} this pipeline's "
                f"denoiser builds: {len(differ)} tensors differ in name or shape (first: {differ[0]})"
            )
        self.controlnet.load_state_dict(theirs)

    def load_decoder(self, unet: nn.Module) -> None:
        """Takes the trained decoder of a ``UNet2DConditionModel`` that an ``sd_locked=False`` run exported
        (``unet/``) into the attached U-Net's decoder (restored on detach).

        Raises:
            CheckpointError: This ControlNet keeps the U-Net locked, or the folder's U-Net is another model: other
                tensors or shapes, or other weights outside the decoder (trained from another base).
        """
        if self.config.sd_locked:
            raise CheckpointError("a unet/ folder's decoder goes into a ControlNet attached with sd_locked=false")
        theirs = dict(unet.named_parameters())
        ours = list(named_base_parameters(self.tower.stages["model"]))
        for name, owner, attr in ours:
            tensor = getattr(owner, attr)
            if name not in theirs or theirs[name].shape != tensor.shape:
                raise CheckpointError(
                    f"the unet/ folder does not fit this pipeline's U-Net: {name} is missing or of another shape"
                )
            if not name.startswith(DECODER_PARTS) and not torch.equal(theirs[name].to(tensor), tensor):
                raise CheckpointError(
                    f"the unet/ folder's U-Net differs from this pipeline's outside its decoder ({name}): it was "
                    "trained from another base model"
                )
        with torch.no_grad():
            for name, owner, attr in ours:
                if name.startswith(DECODER_PARTS):
                    getattr(owner, attr).copy_(theirs[name])

    def diagnostics(self) -> dict[str, float]:
        """The norms of the residuals the last U-Net call received, per down-block residual and mid block."""
        return {f"{self.key}/residual_norm/{key}": value for key, value in getattr(self, "_norms", {}).items()}

    def diffusers_controlnet(self) -> nn.Module:
        """The trained ControlNet as a plain diffusers ``ControlNetModel``."""
        return self.controlnet

    def _control_image(self, sample: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        image = self.call_input("control_image")
        return fit_control_image(
            image,
            sample,
            self.factor,
            cfg.conditioning_channels,
            self.controlnet.dtype,
            f"this ControlNet (its hint encoder downsamples by {self.factor})",
        )

    def _add_residuals(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        given = {name: args[i] if len(args) > i else kwargs.get(name) for i, name in enumerate(UNET_ARGUMENTS)}
        sample = given["sample"]
        down, mid = self.controlnet(
            sample.to(self.controlnet.dtype),
            given["timestep"],
            encoder_hidden_states=given["encoder_hidden_states"].to(self.controlnet.dtype),
            added_cond_kwargs=_in_dtype(given["added_cond_kwargs"], self.controlnet.dtype),
            controlnet_cond=self._control_image(sample),
            conditioning_scale=self.config.conditioning_scale,
            guess_mode=self.config.guess_mode,
            return_dict=False,
        )
        down = [d.to(sample.dtype) for d in down]
        mid = mid.to(sample.dtype)
        with torch.no_grad():  # "the condition is ignored" shows as residual norms that stay at zero
            self._norms = {f"down.{i}": float(d.float().norm()) for i, d in enumerate(down)}
            self._norms["mid"] = float(mid.float().norm())
        kwargs = add_to_call(kwargs, "down_block_additional_residuals", down, self.key)
        previous = kwargs.get("mid_block_additional_residual")
        kwargs["mid_block_additional_residual"] = mid if previous is None else previous + mid
        return args, kwargs

    def _add_flow_residuals(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        given = self.flow.given(args, kwargs)
        hidden = given["hidden_states"]
        condition = self.flow.condition(self.call_input("control_image"), hidden, f"this {self.key}")
        residuals = self.flow.residuals(given, condition, self.config.conditioning_scale)
        with torch.no_grad():
            self._norms = {
                f"{key}.{i}": float(sample.float().norm())
                for key, samples in residuals.items()
                for i, sample in enumerate(samples)
            }
        for key, samples in residuals.items():
            kwargs = add_to_call(kwargs, key, samples, self.key)
        return args, kwargs
