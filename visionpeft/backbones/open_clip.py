"""open_clip CLIP models: the vision tower (open_clip's own transformer or a timm trunk) and the text tower."""

from __future__ import annotations

from torch import nn

from .base import Backbone, Block, Branch, Projection, TokenLayout, Tower
from .timm_vit import _to_2tuple, vit_tower


def _residual_blocks(transformer: nn.Module, prefix: str) -> list[Block]:
    blocks = []
    for i, blk in enumerate(transformer.resblocks):
        attn = blk.attn
        if isinstance(attn, nn.MultiheadAttention):
            projections = {f"attn.{s}": Projection("mha", blk, "attn", slot=s) for s in "qkvo"}
        elif hasattr(attn, "in_proj_weight"):
            raise TypeError("open_clip CustomResidualAttentionBlock attention is not supported")
        else:
            raise TypeError(f"unsupported open_clip block layout: {type(blk).__name__}")
        projections["mlp.fc1"] = Projection("linear", blk.mlp, "c_fc")
        projections["mlp.fc2"] = Projection("linear", blk.mlp, "c_proj")
        branches = {
            "attn": Branch(attn, projections["attn.o"], blk.ln_1),
            "mlp": Branch(blk.mlp, projections["mlp.fc2"], blk.ln_2),
        }
        blocks.append(Block(f"{prefix}blocks.{i}", blk, branches, projections))
    return blocks


def _prefixed(*prefixes: str):
    return lambda name: any(name == p or name.startswith(p + ".") for p in prefixes)


class OpenCLIP(Backbone):
    """Adapter for ``open_clip.CLIP`` and ``open_clip.CustomTextCLIP``."""

    family = "open_clip"
    default_tower = "vision"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        visual = model.visual
        if hasattr(visual, "trunk"):  # open_clip.TimmModel wraps a timm model
            if not hasattr(visual.trunk, "blocks"):
                raise TypeError(f"unsupported timm trunk in open_clip: {type(visual.trunk).__name__}")
            self.towers["vision"] = vit_tower(visual.trunk, owns=_prefixed("visual"))
        elif hasattr(visual, "transformer"):
            transformer = visual.transformer
            grid = _to_2tuple(visual.grid_size)
            tokens = TokenLayout(
                dim=transformer.width,
                num_prefix=1,
                grid=grid,
                patch_size=_to_2tuple(visual.patch_size)[0],
                in_chans=visual.conv1.in_channels,
                batch_first=getattr(transformer, "batch_first", True),
            )
            self.towers["vision"] = Tower("vision", "", _residual_blocks(transformer, ""), _prefixed("visual"), tokens)
        else:
            raise TypeError(f"unsupported open_clip vision tower: {type(visual).__name__}")
        if hasattr(model, "text"):  # CustomTextCLIP
            text = model.text
            if not hasattr(text, "transformer"):
                raise TypeError(f"unsupported open_clip text tower: {type(text).__name__}")
            transformer, owns = text.transformer, _prefixed("text")
        else:
            transformer = model.transformer
            owns = _prefixed("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection")
        self.towers["text"] = Tower("text", "text.", _residual_blocks(transformer, "text."), owns)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            import open_clip
        except ImportError:  # pragma: no cover - open_clip is a dependency
            return False
        return isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP))

    def describe(self) -> dict:
        info = super().describe()
        info["embed_dim"] = self.model.text_projection.shape[-1] if hasattr(self.model, "text_projection") else None
        return info
