"""timm VisionTransformer family (vit_*, deit_*, and the CLIP / DINOv2 / register weights timm hosts)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn

from .base import Backbone, Block, Branch, Projection, TokenLayout, Tower


def to_2tuple(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def timm_token_layout(model: nn.Module) -> TokenLayout:
    """The token layout of a timm ViT-style model (``VisionTransformer``, ``Eva``): width, prefix tokens, the patch
    embedding's grid, patch size and padding."""
    patch = model.patch_embed
    patch_hw = to_2tuple(patch.patch_size)
    return TokenLayout(
        dim=model.embed_dim,
        num_prefix=model.num_prefix_tokens,
        grid=to_2tuple(patch.grid_size),
        patch_size=patch_hw[0],
        in_chans=patch.proj.in_channels,
        patch_hw=patch_hw if patch_hw[0] != patch_hw[1] else None,
        pad=bool(getattr(patch, "dynamic_img_pad", False)),
    )


def vit_tower(
    vit: nn.Module, prefix: str = "", owns=None, name: str = "vision", forward: Callable | None = None
) -> Tower:
    """Describes a timm ``VisionTransformer`` as a tower.

    Args:
        vit: The timm model.
        prefix: Canonical-name prefix. owns: Parameter-name predicate (default: every parameter but the head's).
        name: Tower name. forward: Runs the tower on images (default: ``vit.forward_features``).
    """
    blocks = []
    for i, blk in enumerate(vit.blocks):
        attn, mlp = blk.attn, blk.mlp
        if not (hasattr(attn, "qkv") and hasattr(attn, "proj") and hasattr(mlp, "fc1") and hasattr(mlp, "fc2")):
            raise TypeError(f"unsupported timm block layout in block {i}: {type(blk).__name__}")
        d = attn.qkv.in_features
        projections = {
            f"attn.{s}": Projection("fused", attn, "qkv", slot=s, rows=(j * d, (j + 1) * d))
            for j, s in enumerate("qkv")
        }
        projections["attn.o"] = Projection("linear", attn, "proj")
        projections["mlp.fc1"] = Projection("linear", mlp, "fc1")
        projections["mlp.fc2"] = Projection("linear", mlp, "fc2")
        branches = {
            "attn": Branch(attn, projections["attn.o"], blk.norm1, residual=getattr(blk, "drop_path1", None)),
            "mlp": Branch(mlp, projections["mlp.fc2"], blk.norm2, residual=getattr(blk, "drop_path2", None)),
        }
        blocks.append(Block(f"{prefix}blocks.{i}", blk, branches, projections))
    patch = vit.patch_embed
    tokens = timm_token_layout(vit)
    head_prefixes = ("head.", "head_dist.")  # DeiT's distilled models have a second classifier
    return Tower(
        name,
        prefix,
        blocks,
        owns or (lambda n: not n.startswith(head_prefixes)),
        tokens,
        stages={"embed": patch, "norm": vit.norm, **({"pre_norm": vit.norm_pre} if hasattr(vit, "norm_pre") else {})},
        forward=forward or vit.forward_features,
    )


class TimmViT(Backbone):
    """Adapter for ``timm.models.vision_transformer.VisionTransformer`` and subclasses."""

    family = "timm_vit"
    default_tower = "vision"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.towers["vision"] = vit_tower(model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        module = sys.modules.get("timm.models.vision_transformer")  # never imported: cannot be a timm ViT
        return module is not None and isinstance(model, module.VisionTransformer)

    def library_heads(self) -> dict[str, nn.Module | None]:
        classifier = self.inner.get_classifier()
        if isinstance(classifier, tuple):  # DeiT distilled: (class-token head, distillation-token head)
            return dict(zip(("head", "head_dist"), classifier))
        return {"head": classifier}

    def describe(self) -> dict:
        info = super().describe()
        m = self.inner
        info.update(dim=m.embed_dim, num_prefix_tokens=m.num_prefix_tokens, global_pool=m.global_pool)
        info["pretrained_cfg"] = getattr(m, "pretrained_cfg", {}).get("architecture", None)
        return info
