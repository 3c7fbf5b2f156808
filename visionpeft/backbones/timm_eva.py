"""timm EVA / EVA-02 (``timm.models.eva.Eva``): a ViT-style token tower with rotary position embedding, q/k/v
biases kept outside the qkv Linear, and Mlp / SwiGLU / GluMlp feed-forwards.

Two things of EVA's attention matter to methods, and the adapter handles both while methods are attached (a
forward pre-hook on every attention, undone by :meth:`TimmEva.release`):

- Rotary embedding is applied to the tokens after ``attn.num_prefix_tokens``; prompt tokens VPT inserts after the
  prefix have no position, so they count as prefix tokens there (``num_prefix_tokens`` + the prompts inserted).
- With q/v biases, EVA computes ``F.linear(x, qkv.weight, qkv_bias)``, reading the weight and never calling the
  qkv module, so a LoRA wrapping it, or a forward hook on it (FacT's increment), would be ignored. While qkv is
  wrapped or hooked the attention uses timm's own ``qkv_bias_separate`` path (``qkv(x) + bias``: the same function,
  the biases added after the module's output); for the same reason a PEFT file, which PEFT would load into the
  ignored module, is refused for it (:meth:`TimmEva.export_problem`).
"""

from __future__ import annotations

import sys
from functools import partial

from torch import nn

from .base import Backbone, Block, Branch, Projection, Tower
from .timm_vit import timm_token_layout


def _mlp_projections(mlp: nn.Module) -> dict[str, Projection]:
    """fc1 / fc2 of timm's Mlp and GluMlp (a fused gate + value fc1); SwiGLU's separate ``fc1_g`` / ``fc1_x``."""
    found = {}
    for attr, name in (("fc1", "mlp.fc1"), ("fc1_g", "mlp.fc1_g"), ("fc1_x", "mlp.fc1_x"), ("fc2", "mlp.fc2")):
        if isinstance(getattr(mlp, attr, None), nn.Linear):
            found[name] = Projection("linear", mlp, attr)
    return found


def eva_block(name: str, blk: nn.Module) -> Block:
    attn = blk.attn
    if attn.qkv is not None:
        d = attn.qkv.out_features // 3
        projections = {
            f"attn.{s}": Projection("fused", attn, "qkv", slot=s, rows=(j * d, (j + 1) * d))
            for j, s in enumerate("qkv")
        }
    else:
        projections = {f"attn.{s}": Projection("linear", attn, f"{s}_proj") for s in "qkv"}
    projections["attn.o"] = Projection("linear", attn, "proj")
    projections.update(_mlp_projections(blk.mlp))
    branches = {
        "attn": Branch(attn, projections["attn.o"], blk.norm1, residual=getattr(blk, "drop_path1", None)),
        "mlp": Branch(blk.mlp, projections.get("mlp.fc2"), blk.norm2, residual=getattr(blk, "drop_path2", None)),
    }
    return Block(name, blk, branches, projections)


def called_by_methods(module: nn.Module | None) -> bool:
    """Whether a method wrapped ``module`` or hooks its forward, so the model must call it to see the method."""
    if module is None:
        return False
    return getattr(module, "_vp_wrapper", False) or bool(module._forward_hooks or module._forward_pre_hooks)


class TimmEva(Backbone):
    """Adapter for ``timm.models.eva.Eva`` with pre-norm ``EvaBlock`` blocks (EVA, EVA-02, and the other models
    timm builds with this class); the post-norm variant is left to the generic adapter."""

    family = "timm_eva"
    default_tower = "vision"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        blocks = [eva_block(f"blocks.{i}", blk) for i, blk in enumerate(model.blocks)]
        tokens = timm_token_layout(model)
        stages = {"embed": model.patch_embed, "norm": model.norm}
        owns = lambda name: not name.startswith("head.")  # noqa: E731
        self.towers["vision"] = Tower("vision", "", blocks, owns, tokens, stages=stages, forward=model.forward_features)
        self._attention_defaults: list[tuple[nn.Module, int, bool]] = []

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        module = sys.modules.get("timm.models.eva")  # never imported: cannot be an EVA
        if module is None or not isinstance(model, module.Eva):
            return False
        return all(type(blk) is module.EvaBlock for blk in model.blocks)

    def library_heads(self) -> dict[str, nn.Module | None]:
        return {"head": self.inner.head}

    def install_hooks(self) -> None:
        super().install_hooks()
        for block in self.towers["vision"].blocks:
            attn = block.module.attn
            defaults = (attn.num_prefix_tokens, attn.qkv_bias_separate)
            self._attention_defaults.append((attn, *defaults))
            self._handles.append(attn.register_forward_pre_hook(partial(self._prepare_attention, *defaults)))

    def _prepare_attention(self, base_prefix: int, separate: bool, attn: nn.Module, args: tuple) -> None:
        attn.num_prefix_tokens = base_prefix + self.towers["vision"].tokens.extra_prefix
        attn.qkv_bias_separate = separate or called_by_methods(attn.qkv)

    def release(self) -> None:
        super().release()
        for attn, prefix, separate in self._attention_defaults:
            attn.num_prefix_tokens, attn.qkv_bias_separate = prefix, separate
        self._attention_defaults = []

    def export_problem(self, path: str, format: str) -> str | None:
        parent, _, attr = path.rpartition(".")
        attn = self.inner.get_submodule(parent) if parent else None
        if attr != "qkv" or getattr(attn, "q_bias", None) is None:
            return None
        separate = next((s for a, _, s in self._attention_defaults if a is attn), attn.qkv_bias_separate)
        if separate:
            return None
        return (
            f"{path}: EVA's attention reads qkv.weight directly when it has q/v biases, so {format} would load a LoRA "
            "there into a module it never calls; save with format='visionpeft', or export_merged the model"
        )

    def describe(self) -> dict:
        info = super().describe()
        m = self.inner
        info.update(dim=m.embed_dim, num_prefix_tokens=m.num_prefix_tokens, global_pool=m.global_pool)
        return info
