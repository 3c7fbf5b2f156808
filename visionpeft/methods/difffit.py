"""DiffFit (Xie et al., ICCV 2023): biases, norms and a learnable per-channel scale on every residual branch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import IncompatibleMethodError
from ..schema import setting
from .base import Method, MethodConfig, branch_tensor, register_method, replace_branch_tensor


@dataclass
class DiffFitConfig(MethodConfig):
    """DiffFit options. The paper (arXiv 2304.06648, sec. 3.2) fine-tunes the bias terms, the normalisation
    layers and the class-condition embedding, and multiplies each residual branch by a per-channel factor
    gamma initialised to 1 (so the model starts unchanged). On ViT-B/16: 138,240 + 768 + 1,536 = 140,544
    parameters (0.14 M, matching the PETL_Vision table).

    Attributes:
        scales: Add the per-channel gamma on residual branches.
        norms: Train the normalisation layers' affine parameters.
        condition: Train the class-condition embedding of a DiT (the paper's "class condition module").
    """

    scales: bool = setting(True, "add the per-channel gamma on residual branches")
    norms: bool = setting(True, "train the normalisation layers' affine parameters")
    condition: bool = setting(True, "train a DiT's class-condition embedding")


class ChannelScale(nn.Module):
    """A per-channel factor gamma, initialised to 1."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))


_NORMS = (nn.LayerNorm, nn.GroupNorm)


@register_method
class DiffFit(Method):
    name = "difffit"
    config_class = DiffFitConfig
    merges_exactly = True
    merge_priority = 1  # scales fold in after additive updates to the same projection

    def check_fits(self) -> None:
        super().check_fits()
        if self.config.scales and not self.blocks():
            raise IncompatibleMethodError(
                f"difffit's scales need residual blocks; visionpeft describes none in a "
                f"{type(self.backbone.inner).__name__} (set difffit.scales=false to train biases and norms only)"
            )

    def build(self) -> None:
        cfg = self.config
        model = self.backbone.model
        norm_params = set()
        if cfg.norms:
            for module in model.modules():
                if isinstance(module, _NORMS):
                    norm_params.update(id(p) for p in module.parameters(recurse=False))
        condition = self.tower.condition if cfg.condition else None
        for name, owner, attr in self.tower_parameters():
            param = getattr(owner, attr)
            if attr.endswith("bias") or id(param) in norm_params or (condition is not None and condition(name)):
                self.train_in_place(name, owner, attr)
        if not cfg.scales:
            return
        self._scales = []
        for block in self.blocks():
            for branch_name, branch in block.branches.items():
                dim = self._branch_width(block.name, branch_name, branch)
                scale = self.add_module(block.module, f"{block.name}.{branch_name}.difffit", ChannelScale(dim))
                self.hook_output(branch.module, self._scale, scale)
                self._scales.append((block.name, branch_name, branch, scale))

    @staticmethod
    def _branch_width(block_name: str, branch_name: str, branch) -> int:
        if branch.output is None:
            raise IncompatibleMethodError(f"difffit cannot find the output width of {block_name}.{branch_name}")
        weight, _ = branch.output.weight_and_bias()
        return weight.shape[0]

    def _scale(self, scale: ChannelScale, module: nn.Module, args: tuple, output):
        out = branch_tensor(output)
        gamma = scale.gamma.to(out.dtype)
        if out.dim() == 4:  # (B, C, H, W) conv outputs
            gamma = gamma[:, None, None]
        return replace_branch_tensor(output, out * gamma)

    def merge(self) -> None:
        for block_name, branch_name, branch, _ in getattr(self, "_scales", []):
            if not branch.exact_scale_merge:
                raise IncompatibleMethodError(
                    f"difffit's scale on {block_name}.{branch_name} cannot be folded into a projection exactly"
                )
        with torch.no_grad():
            for _, _, branch, scale in getattr(self, "_scales", []):
                weight, bias = branch.output.weight_and_bias()
                gamma = scale.gamma.to(weight.dtype)
                weight.mul_(gamma.view(-1, *([1] * (weight.dim() - 1))))
                if bias is not None:
                    bias.mul_(gamma)
        self._originals = {}
