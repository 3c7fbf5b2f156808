"""SSF (Lian et al., NeurIPS 2022, "Scaling & Shifting Your Features"): a learned per-channel scale and shift
``y * scale + shift`` after the qkv, output, fc1 and fc2 projections and both LayerNorms of every block, after the
patch embedding and after the final norm (official code: dongzelian/SSF ``models/vision_transformer.py``).

Every site follows a Linear, a LayerNorm or the patch-embedding conv, so :meth:`SSF.merge` folds it into that
layer exactly: ``(x W^T + b) * s + t = x (s W)^T + (s b + t)``, and the same for a LayerNorm's affine parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import IncompatibleMethodError
from ..schema import setting
from .base import Method, MethodConfig, register_method
from .hook_order import HookSite, SiteOrder, site_order


@dataclass
class SSFConfig(MethodConfig):
    """SSF options. The official initialisation (``init_ssf_scale_shift``): scale ~ N(1, init_std), shift ~
    N(0, init_std), init_std = 0.02, so the model does not start unchanged. On ViT-B/16: 12 blocks x 2 x (3 x 768 +
    768 + 3,072 + 768 + 768 + 768) + 2 x 768 (patch embedding) + 2 x 768 (final norm) = 268 x 768 = 205,824
    parameters (PETL_Vision's count).

    Attributes:
        init_std: Standard deviation of the scale's and the shift's normal initialisation.
    """

    init_std: float = setting(0.02, "std of the normal initialisation: scale ~ N(1, std), shift ~ N(0, std)", min=0)


class ScaleShift(nn.Module):
    """A per-channel ``scale`` and ``shift``, drawn as the official ``init_ssf_scale_shift``."""

    def __init__(self, dim: int, std: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim))
        self.shift = nn.Parameter(torch.empty(dim))
        nn.init.normal_(self.scale, mean=1.0, std=std)
        nn.init.normal_(self.shift, mean=0.0, std=std)

    def apply_to(self, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
        scale, shift = self.scale.to(y.dtype), self.shift.to(y.dtype)
        if channel_dim == 1 and y.dim() == 4:  # (B, C, H, W) conv output
            scale, shift = scale[:, None, None], shift[:, None, None]
        return y * scale + shift


def _patch_conv(embed: nn.Module | None) -> nn.Conv2d | None:
    """The conv of a patch embedding stage: the stage itself (open_clip ``conv1``) or its ``proj`` (timm)."""
    if isinstance(embed, nn.Conv2d):
        return embed
    proj = getattr(embed, "proj", None)
    return proj if isinstance(proj, nn.Conv2d) else None


@register_method
class SSF(Method):
    name = "ssf"
    config_class = SSFConfig
    merges_exactly = True
    requires = {"tokens": "a ViT token tower (patch embedding, pre-norm blocks, final norm)"}

    def check_fits(self) -> None:
        super().check_fits()
        kind = type(self.backbone.inner).__name__
        for block in self.blocks():
            if any(p.kind == "mha" for p in block.projections.values()):
                raise IncompatibleMethodError(
                    f"ssf needs the qkv and output projections as Linear layers; {block.name} computes them inside "
                    "nn.MultiheadAttention"
                )
            if any(branch.norm is None for branch in block.branches.values()):
                raise IncompatibleMethodError(f"ssf needs a pre-norm on every branch; {block.name} has none")
            if any(getattr(branch.module, "q_bias", None) is not None for branch in block.branches.values()):
                raise IncompatibleMethodError(
                    f"ssf needs the qkv output; {block.name} adds its q/v biases outside the qkv Linear (EVA)"
                )
        if _patch_conv(self.tower.stages.get("embed")) is None or self.tower.stages.get("norm") is None:
            raise IncompatibleMethodError(f"ssf needs a patch-embedding conv and a final norm; a {kind} lacks one")

    def build(self) -> None:
        std = self.config.init_std
        self._sites: list[tuple[str, nn.Module, ScaleShift, int]] = []  # (site, layer it follows, ssf, its hook id)
        embed = _patch_conv(self.tower.stages["embed"])
        self._add_site(self.tower.prefix + "embed", self.tower.stages["embed"], embed, embed.out_channels, 1, std)
        for block in self.blocks():
            seen: set[int] = set()
            for name, projection in block.projections.items():
                layer = projection.layer
                if id(layer) in seen:  # q, k and v rows of one fused qkv: one site over all its outputs
                    continue
                seen.add(id(layer))
                site = "attn.qkv" if projection.kind == "fused" else name
                width = projection.base_layer().weight.shape[0]
                self._add_site(f"{block.name}.{site}", block.module, layer, width, -1, std)
            for branch_name, branch in block.branches.items():
                dim = self.tower.tokens.dim
                self._add_site(f"{block.name}.{branch_name}.norm", block.module, branch.norm, dim, -1, std)
        norm = self.tower.stages["norm"]
        self._add_site(self.tower.prefix + "norm", norm, norm, self.tower.tokens.dim, -1, std)

    def _add_site(
        self, canonical: str, parent: nn.Module, layer: nn.Module, width: int, channel_dim: int, std: float
    ) -> None:
        ssf = self.add_module(parent, f"{canonical}.ssf", ScaleShift(width, std))
        self.hook_output(layer, self._apply, ssf, channel_dim)
        self._sites.append((canonical, layer, ssf, self._hooks[-1].id))

    @staticmethod
    def _apply(ssf: ScaleShift, channel_dim: int, module: nn.Module, args: tuple, output: torch.Tensor):
        return ssf.apply_to(output, channel_dim)

    @property
    def merge_priority(self) -> float:  # type: ignore[override]
        """Where the fold goes among the merged methods, by where the scale-shift sits (:mod:`.hook_order`): outside
        another method's additive update of the same layer (``lora`` wrapped it, or ``fact`` hooked it, before
        ``ssf``: ``s (W x + B A x + b) + t``) it folds after that update; on a bare layer (updated later or never:
        ``s (W x + b) + t + B A x``) before it. Either way before the output scales (DiffFit, priority 1) that
        multiply the shift too. Where no order is exact, first, so that :meth:`merge` refuses before any other
        method has merged."""
        return self._order().merge_priority

    def _order(self) -> SiteOrder:
        return site_order(self.backbone.model, (HookSite(c, layer, hook_id) for c, layer, _, hook_id in self._sites))

    def merge(self) -> None:
        self._order().check_foldable(self.name)
        folds = []
        for canonical, layer, ssf, _ in self._sites:
            while getattr(layer, "_vp_wrapper", False):
                layer = layer.base
            weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
            if weight is None or bias is None:
                missing = "a weight" if weight is None else "a bias"
                raise IncompatibleMethodError(
                    f"ssf after {canonical} cannot be folded into its {type(layer).__name__}, which has no {missing}"
                )
            folds.append((weight, bias, ssf))
        with torch.no_grad():
            for weight, bias, ssf in folds:
                scale, shift = ssf.scale.to(weight.dtype), ssf.shift.to(weight.dtype)
                weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))
                bias.mul_(scale).add_(shift)
        self._originals = {}
