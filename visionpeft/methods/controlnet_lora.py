"""ControlNet-LoRA: the ControlNet copy of the U-Net's encoder stays frozen with LoRA on its linear layers, while
the parts a fresh ControlNet cannot do without train in full: the zero convolutions, the hint encoder and the norms
(the split of Stability AI's Control-LoRA and of CtrLoRA).

The frozen copy is rebuilt from the U-Net whenever the adapter is loaded, so a checkpoint holds only the LoRA factors
and the fully trained parts (a few percent of a ControlNet). The ``diffusers`` export writes both the merged
``controlnet/`` folder and that small file for diffusers' own loader,
``controlnet_lora/pytorch_lora_weights.safetensors``: ``ControlNetModel.from_unet(unet,
conditioning_embedding_out_channels=...)`` then
``controlnet.load_lora_adapter(RUN / "controlnet_lora", weight_name="pytorch_lora_weights.safetensors", prefix=None)``
(diffusers' Control-LoRA call).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..layers.lora import LoRALinear
from ..schema import setting
from .base import ExportParts, register_method
from .controlnet import ControlNet, ControlNetConfig

#: LoRA target -> the suffix of the ControlNet's Linear layers it selects (diffusers' attention / feed-forward names)
TARGETS = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "fc1": "ff.net.0.proj", "fc2": "ff.net.2"}
FULL_PARTS = ("zero_convs", "hint_encoder", "norms")
#: where the diffusers export puts the LoRA-only file (named as diffusers' LoRA files)
LORA_FOLDER, LORA_WEIGHT_NAME = "controlnet_lora", "pytorch_lora_weights.safetensors"


@dataclass
class ControlNetLoRAConfig(ControlNetConfig):
    """ControlNet-LoRA options (Control-LoRA: rank 128 / 256 releases; CtrLoRA and diffusers-style recipes: 32).

    Attributes:
        r: LoRA rank. alpha: Scaling numerator (``alpha = r``: scale 1). dropout: Dropout on the LoRA input.
        targets: Linear layers of the copy that get a LoRA: ``q``, ``k``, ``v``, ``o`` (attention), ``fc1``,
            ``fc2`` (feed-forward), or ``linear`` for every Linear layer.
        train_full: Parts of the copy trained in full: ``zero_convs`` (required), ``hint_encoder``, ``norms``.
    """

    r: int = setting(32, "LoRA rank", min=1)
    alpha: float = setting(32.0, "LoRA scaling numerator (alpha = r: scale 1)", above=0)
    dropout: float = setting(0.0, "dropout on the LoRA input", min=0, below=1)
    targets: tuple[str, ...] = setting(("q", "k", "v", "o"), "Linear layers of the copy with a LoRA", nonempty=True)
    train_full: tuple[str, ...] = setting(FULL_PARTS, "parts of the copy trained in full", nonempty=True)


@register_method
class ControlNetLoRA(ControlNet):
    name = "controlnet_lora"
    config_class = ControlNetLoRAConfig
    diffusers_folder_class = None  # its controlnet/ folder (LoRA merged) is a plain ControlNetModel: read as controlnet

    def check_fits(self) -> None:
        super().check_fits()
        cfg = self.config
        unknown = [t for t in cfg.targets if t not in TARGETS and t != "linear"]
        if unknown:
            raise ConfigError(
                f"controlnet_lora targets {unknown} unknown; choose from {', '.join([*TARGETS, 'linear'])}"
            )
        parts = [p for p in cfg.train_full if p not in FULL_PARTS]
        if parts:
            raise ConfigError(f"controlnet_lora train_full {parts} unknown; choose from {', '.join(FULL_PARTS)}")
        if not cfg.sd_locked:
            raise ConfigError(
                "controlnet_lora keeps the U-Net locked (a few percent of a ControlNet); sd_locked=false is "
                "controlnet's option"
            )
        if "zero_convs" not in cfg.train_full:
            raise ConfigError(
                "controlnet_lora must train its zero convolutions: a fresh ControlNet's zero convs block every "
                "gradient upstream of them, so with them frozen nothing would ever train"
            )

    def build(self) -> None:
        super().build()
        net = self.controlnet
        kept = {f"{self.tower_name}.{name}" for name in self._trained_in_full(net)}
        self.tensors = {name: ref for name, ref in self.tensors.items() if name in kept}  # the rest stays frozen
        suffixes = [TARGETS[t] for t in self.config.targets if t in TARGETS]
        everything = "linear" in self.config.targets
        for path, module in list(net.named_modules()):
            if isinstance(module, nn.Linear) and (everything or any(path.endswith(s) for s in suffixes)):
                self._add_lora(net, path, module)

    def export_parts(self, format: str) -> ExportParts:
        parts = super().export_parts(format)
        folder = LORA_FOLDER + self.key.removeprefix(self.name)  # a second ControlNet-LoRA's: controlnet_lora_1
        parts.files[f"{folder}/{LORA_WEIGHT_NAME}"] = self.diffusers_lora_tensors()
        return parts

    def diffusers_lora_tensors(self) -> dict[str, torch.Tensor]:
        """What ``ControlNetModel.load_lora_adapter(folder, weight_name=..., prefix=None)`` reads onto the
        ControlNet that ``ControlNetModel.from_unet`` builds from the same U-Net: each LoRA under its layer's
        ``ControlNetModel`` name in PEFT's keys (``<layer>.lora_A.weight`` / ``.lora_B.weight``, the scale folded
        into B: without alphas diffusers' config takes ``lora_alpha = r``), then the parts trained in full under
        their own names, which PEFT's ``set_peft_model_state_dict`` loads into the model as they are."""
        tensors = {}
        for path, module in self.controlnet.named_modules():
            if isinstance(module, LoRALinear):
                a, b = module.stacked()
                tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"] = a.detach(), b.detach()
        for name, (owner, attr) in self.tensors.items():
            if not name.endswith((".lora_A", ".lora_B")):  # LoRALinear's own factors are written above
                tensors[name.removeprefix(f"{self.tower_name}.")] = getattr(owner, attr).detach()
        return tensors

    def diffusers_controlnet(self) -> nn.Module:
        """A copy of the ControlNet with every LoRA folded into its Linear layers: a plain ``ControlNetModel``."""
        merged = copy.deepcopy(self.controlnet)
        for path, module in list(merged.named_modules()):
            if isinstance(module, LoRALinear):
                module.merge()
                parent_path, _, attr = path.rpartition(".")
                setattr(merged.get_submodule(parent_path) if parent_path else merged, attr, module.base)
        return merged

    def _trained_in_full(self, net: nn.Module) -> list[str]:
        """Names (inside the ControlNet) of the parameters trained in full."""
        parts = self.config.train_full
        owners = {
            "zero_convs": ("controlnet_down_blocks.", "controlnet_mid_block."),
            "hint_encoder": ("controlnet_cond_embedding.",),
        }
        prefixes = [prefix for part in parts for prefix in owners.get(part, ())]
        norms = set()
        if "norms" in parts:
            norm_types = (nn.GroupNorm, nn.LayerNorm)
            norms = {f"{path}." for path, module in net.named_modules() if isinstance(module, norm_types)}
        return [
            name
            for name, _ in net.named_parameters()
            if name.startswith(tuple(prefixes)) or any(name.startswith(n) for n in norms)
        ]

    def _add_lora(self, net: nn.Module, path: str, layer: nn.Linear) -> None:
        parent_path, _, attr = path.rpartition(".")
        parent = net.get_submodule(parent_path) if parent_path else net
        cfg = self.config
        wrapper = LoRALinear(layer, {"main": (0, layer.out_features)}, cfg.r, cfg.alpha, cfg.dropout)
        self.wrap(parent, attr, wrapper, lambda pname: f"{self.tower_name}.{path}.{pname.split('.')[-1]}")
