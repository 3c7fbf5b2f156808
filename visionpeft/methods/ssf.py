"""SSF (Lian et al., NeurIPS 2022, "Scaling & Shifting Your Features"): a learned per-channel scale and shift
``y * scale + shift`` after the qkv, output, fc1 and fc2 projections and both LayerNorms of every block, after the
patch embedding and after the final norm (official code: dongzelian/SSF ``models/vision_transformer.py``).

Every site follows a Linear, a LayerNorm or the patch-embedding conv, so :meth:`SSF.merge` folds it into that
layer exactly: ``(x W^T + b) * s + t = x (s W)^T + (s b + t)``, and the same for a LayerNorm's affine parameters.
A bias-less patch-embedding conv (open_clip's ``conv1``) takes the scale, and the position embedding's patch rows
the shift. On ``nn.MultiheadAttention`` (open_clip's own towers: projections of kind ``mha``) the sites after qkv
and after the output projection act on the attention's weights (:class:`ScaleShiftMultiheadAttention`): the same
function, the same parameters under timm's names; a merge needs its ``in_proj_bias`` and ``out_proj.bias`` (an
attention without them refuses in one line rather than growing a bias the plain model lacks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbones.base import Projection
from ..errors import IncompatibleMethodError
from ..layers.scale_shift import ScaleShift, ScaleShiftMultiheadAttention
from ..schema import setting
from .base import Method, MethodConfig, register_method
from .hook_order import BEFORE_UPDATES, HookSite, SiteOrder, site_order


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


#: A hooked site's fold: the layer's weight, its bias (None: the shift goes to the position rows), the position
#: embedding's patch rows (for a bias-less patch embedding) and the scale-shift.
Fold = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, ScaleShift]


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
            for name, projection in block.projections.items():
                if projection.kind == "mha" and getattr(projection.layer, "_vp_wrapper", False):
                    raise IncompatibleMethodError(
                        f"ssf cannot scale {block.name}.{name}: another attached method "
                        f"({type(projection.layer).__name__}) already rewrites the weights of that attention"
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
        self._attentions: list[tuple[str, ScaleShiftMultiheadAttention]] = []  # (site, wrapper)
        embed = _patch_conv(self.tower.stages["embed"])
        self._add_site(self.tower.prefix + "embed", self.tower.stages["embed"], embed, embed.out_channels, 1, std)
        for block in self.blocks():
            seen: set[int] = set()
            for name, projection in block.projections.items():
                if id(projection.base_layer()) in seen:  # the q, k and v rows of one fused qkv: one site over all
                    continue
                seen.add(id(projection.base_layer()))
                if projection.kind == "mha":  # q, k, v, o of one attention: ssf after its in- and out-projection
                    self._wrap_attention(f"{block.name}.{name.rpartition('.')[0]}", projection, std)
                    continue
                site = "attn.qkv" if projection.kind == "fused" else name
                width = projection.base_layer().weight.shape[0]
                self._add_site(f"{block.name}.{site}", block.module, projection.layer, width, -1, std)
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

    def _wrap_attention(self, attention: str, projection: Projection, std: float) -> None:
        """Puts the scale-shifts of the attention ``attention`` (``blocks.0.attn``) on its weights: its parameters
        ``ssf.qkv.scale`` ... get the canonical names of timm's sites, ``<attention>.qkv.ssf.scale`` ..."""
        wrapper = ScaleShiftMultiheadAttention(projection.layer, std)

        def canonical(pname: str) -> str:  # ssf.<site>.<tensor>
            _, site, tensor = pname.split(".")
            return f"{attention}.{site}.ssf.{tensor}"

        self.wrap(projection.parent, projection.attr, wrapper, canonical)
        self._attentions.append((attention, wrapper))

    @staticmethod
    def _apply(ssf: ScaleShift, channel_dim: int, module: nn.Module, args: tuple, output: torch.Tensor):
        return ssf.apply_to(output, channel_dim)

    @property
    def merge_priority(self) -> float:  # type: ignore[override]
        """Where the fold goes among the merged methods, by where the scale-shift sits (:mod:`.hook_order`): outside
        another method's additive update of the same layer (``lora`` wrapped it, or ``fact`` hooked it, before
        ``ssf``: ``s (W x + B A x + b) + t``) it folds after that update; on a bare layer (updated later or never:
        ``s (W x + b) + t + B A x``) before it. Either way before the output scales (DiffFit, priority 1) that
        multiply the shift too. Where no order is exact, or a site has nothing to fold into, first, so that
        :meth:`merge` refuses before any other method has merged. The attentions' scale-shifts act on weights no
        other method rewrites (each refuses a rewritten attention), so any order folds them exactly."""
        if self._folds()[1] is not None:
            return BEFORE_UPDATES
        return self._order().merge_priority

    def _order(self) -> SiteOrder:
        return site_order(self.backbone.model, (HookSite(c, layer, hook_id) for c, layer, _, hook_id in self._sites))

    def _position_rows(self, layer: nn.Module) -> torch.Tensor | None:
        """The patch tokens' rows of the tower's position embedding (a view) when ``layer`` is the patch-embedding
        conv and the backbone describes that embedding, else None: a constant shift of every patch token folds there."""
        if layer is not _patch_conv(self.tower.stages["embed"]) or self.tower.position is None:
            return None
        owner, attr = self.tower.position
        table = getattr(owner, attr)
        return table.view(-1, table.shape[-1])[self.tower.tokens.num_prefix :]

    def _folds(self) -> tuple[list[Fold], str | None]:
        """``(weight, bias, position rows, ssf)`` of every hooked site, the shift folding into the layer's bias or,
        for a patch-embedding conv without one, into the position embedding's patch rows; and the one-line reason
        why some site, or an attention, has nothing to fold into (None when every one has)."""
        folds = []
        for canonical, layer, ssf, _ in self._sites:
            while getattr(layer, "_vp_wrapper", False):
                layer = layer.base
            weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
            position = self._position_rows(layer) if bias is None else None
            if weight is None or (bias is None and position is None):
                missing = "weight" if weight is None else "bias"
                where = f"{canonical} cannot be folded into its {type(layer).__name__}"
                return folds, f"ssf after {where}, which has no {missing}"
            folds.append((weight, bias, position, ssf))
        for attention, wrapper in self._attentions:
            missing = wrapper.missing_bias()
            if missing is not None:
                return folds, (
                    f"ssf after {attention}'s projections cannot be folded into its nn.MultiheadAttention, which has "
                    f"no {missing}"
                )
        return folds, None

    def merge(self) -> None:
        self._order().check_foldable(self.name)
        folds, blocker = self._folds()
        if blocker is not None:
            raise IncompatibleMethodError(blocker)
        with torch.no_grad():
            for weight, bias, position, ssf in folds:
                new_weight, new_bias = ssf.folded(weight, bias)
                weight.copy_(new_weight)
                if bias is None:  # a bias-less patch embedding: the shift of every patch token, in its position rows
                    position.add_(new_bias)
                else:
                    bias.copy_(new_bias)
            for _, wrapper in self._attentions:
                wrapper.merge()
        self._originals = {}
