"""RepAdapter (Luo et al. 2023, "Towards Efficient Visual Adaption via Structural Re-parameterization"; official code
luogen1996/RepAdapter ``repadapter.py``, commit 360992f).

Each block gets two adapters, placed sequentially before its attention (after the pre-norm, before qkv) and before
its MLP (after the pre-norm, before fc1), as the official ``forward_vit_block_adapter`` (lines 21-24):
``x -> x + scale * conv_B(dropout(conv_A(x)))`` with ``conv_A`` a 1x1 dense map to ``bottleneck`` channels and
``conv_B`` a grouped 1x1 map back (:class:`~visionpeft.layers.adapters.RepAdapterLayer`). ``conv_A`` starts
Xavier-uniform, ``conv_B`` and the biases at zero, so the model starts unchanged. The layer scale and drop path of
the branch stay where the backbone has them (the official block function skips ViT's layer scale, which ViT-B/16
does not have).

Structural re-parameterisation: without dropout an adapter is affine, ``x -> T x + c`` with ``T = I + s B A`` and
``c = s (B a + b)``, so :meth:`RepAdapter.merge` folds it into every Linear that reads its output (timm's qkv, or
the ``in_proj`` of open_clip's ``nn.MultiheadAttention``; fc1): ``W' = W T``, ``b' = b + W c`` - the official
``set_RepWeight`` (lines 271-299). The fold multiplies the weight from the input side, so it comes after the
additive updates of the same layers (LoRA, FacT: priority 0) and commutes with SSF's output-side scale and shift.
A layer without a bias cannot take ``W c``: EVA's key projection has none (its q / v biases sit outside the fused
qkv, and its separate ``k_proj`` is built without one), so on EVA the adapters train but merge is refused in one
line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbones.base import Block, Projection
from ..errors import ConfigError, IncompatibleMethodError
from ..layers.adapters import RepAdapterLayer
from ..schema import setting
from .base import Method, MethodConfig, register_method

#: The projections that may read each adapted branch's input; those a block has are folded into.
BRANCH_READERS = {"attn": ("attn.q", "attn.k", "attn.v"), "mlp": ("mlp.fc1", "mlp.fc1_g", "mlp.fc1_x")}


@dataclass
class RepAdapterConfig(MethodConfig):
    """RepAdapter options. Defaults are the official module's (``repadapter.py`` line 150-156:
    ``RepAdapter(in_features=768, hidden_dim=8, groups=2, scale=1)``, line 160: ``nn.Dropout(0.1)``; ``set_RepAdapter``
    line 223: ``dim=8, s=1``); the official VTAB-1k configs set ``scale`` per task (``configs/repblock/*.yaml``:
    0.1 on CIFAR-100, 1 on DTD, ...), PETL_Vision's grid searches bottleneck 8 / 16 / 32 and scale 0.1 ... 10
    (``experiment/config/method/repadapter.yml``) with ``repadapter_group: 2``. Per adapter: ``D x b + b`` (conv_A)
    + ``D x b / groups + D`` (conv_B); ViT-B/16 (24 adapters): 239,808 parameters at bottleneck 8, 461,184 at 16
    (PETL_Vision's counts).

    Attributes:
        bottleneck: Hidden width of each adapter (conv_A's output channels).
        groups: Groups of the up-projection conv_B; must divide the bottleneck and the token width.
        scale: Multiplier ``s`` of the adapter's output.
        dropout: Dropout between conv_A and conv_B.
    """

    bottleneck: int = setting(8, "hidden width of each adapter (conv_A's output channels)", min=1)
    groups: int = setting(2, "groups of the up-projection conv_B; divides bottleneck and the token width", min=1)
    scale: float = setting(1.0, "multiplier s of the adapter output", above=0)
    dropout: float = setting(0.1, "dropout between conv_A and conv_B", min=0, below=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bottleneck % self.groups:
            raise ConfigError(
                f"method 'repadapter' option 'groups' must divide bottleneck ({self.bottleneck}), got {self.groups}"
            )


@register_method
class RepAdapter(Method):
    name = "repadapter"
    config_class = RepAdapterConfig
    merges_exactly = True

    def readers(self, block: Block, branch: str) -> list[tuple[str, Projection]]:
        """``(canonical name, projection)`` of the layers reading the adapted input of ``branch``."""
        return [(f"{block.name}.{p}", block.projections[p]) for p in BRANCH_READERS[branch] if p in block.projections]

    def check_fits(self) -> None:
        super().check_fits()
        where = f"the {self.backbone.family} '{self.tower.name}' tower"
        if not self.blocks():
            raise IncompatibleMethodError(f"repadapter needs transformer blocks; {where} has none")
        for block in self.blocks():
            for branch in BRANCH_READERS:
                if branch not in block.branches or not self.readers(block, branch):
                    raise IncompatibleMethodError(
                        f"repadapter needs attention and MLP branches (q / k / v and fc1 projections) in every block; "
                        f"{block.name} of {where} has {', '.join(block.branches)}"
                    )
                if block.branches[branch].norm is None and self.on_norm(block, branch):
                    raise IncompatibleMethodError(f"repadapter needs the pre-norm of {block.name}.{branch}")
            width = self.width(block)
            if width % self.config.groups:
                raise ConfigError(
                    f"method 'repadapter' option 'groups' must divide the token width {width} of {where}, "
                    f"got {self.config.groups}"
                )

    def width(self, block: Block) -> int:
        weight, _ = self.readers(block, "attn")[0][1].weight_and_bias()
        return weight.shape[1]

    @staticmethod
    def on_norm(block: Block, branch: str) -> bool:
        """Whether the adapter hooks the pre-norm's output instead of the branch's input: for
        ``nn.MultiheadAttention`` (open_clip), which a LoRA replaces by a wrapper that never calls it."""
        return any(p.kind == "mha" for p in (block.projections.get(n) for n in BRANCH_READERS[branch]) if p)

    def build(self) -> None:
        cfg = self.config
        self._sites: list[tuple[str, RepAdapterLayer, list[tuple[str, Projection]], nn.Module]] = []
        for block in self.blocks():
            for branch_name in BRANCH_READERS:
                branch = block.branches[branch_name]
                layer = RepAdapterLayer(self.width(block), cfg.bottleneck, cfg.groups, cfg.scale, cfg.dropout)
                site = f"{block.name}.{branch_name}"
                self.add_module(block.module, f"{site}.repadapter", layer)
                if self.on_norm(block, branch_name):
                    self.hook_output(branch.norm, self._adapt_output, layer)
                else:  # the official block: attn(adapter(norm1(x))), mlp(adapter(norm2(x)))
                    self.hook_input(branch.module, self._adapt_input, layer)
                self._sites.append((site, layer, self.readers(block, branch_name), branch.module))

    @staticmethod
    def _adapt_input(layer: RepAdapterLayer, module: nn.Module, args: tuple) -> tuple:
        return (layer(args[0]), *args[1:])

    @staticmethod
    def _adapt_output(layer: RepAdapterLayer, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return layer(output)

    @property
    def merge_priority(self) -> float:  # type: ignore[override]
        """After the additive updates of the layers the adapters fold into (LoRA, FacT: 0), since ``W T`` must take
        ``W`` with them; SSF's scale-shift after those layers commutes with the fold. A fold that cannot work goes
        first, so that :meth:`merge` refuses before any other method has merged."""
        return -1 if self._fold_problem() else 0.75

    def _fold_problem(self) -> str | None:
        """Why some adapter cannot be folded into the layers reading it, or None."""
        for site, _, readers, module in self._sites:
            if isinstance(getattr(module, "gate", None), nn.Module):  # EVA's gated attention
                return f"repadapter at {site} cannot be folded: the attention's gate reads the adapted tokens too"
            for name, proj in readers:
                if proj.weight_and_bias()[1] is None:
                    outside = getattr(module, "q_bias", None) is not None
                    reason = " (EVA keeps the q / v biases outside the qkv Linear)" if outside else ""
                    return (
                        f"repadapter at {site} cannot be folded into {name}, which has no bias to take the adapter's "
                        f"constant term{reason}"
                    )
        return None

    def _pending_update(self) -> str | None:
        """A layer the adapters fold into that another attached method still updates (a wrapper or a forward
        hook): folding before that update is merged would move it to the unadapted input."""
        for _, _, readers, _ in self._sites:
            for name, proj in readers:
                base = proj.base_layer()
                if proj.layer is not base or base._forward_hooks or base._forward_pre_hooks:
                    return name
        return None

    @torch.no_grad()
    def merge(self) -> None:
        problem = self._fold_problem()
        if problem:
            raise IncompatibleMethodError(problem)
        pending = self._pending_update()
        if pending:
            raise IncompatibleMethodError(
                f"repadapter folds into {pending}, which another attached method still updates; merge them "
                "together (vp.merge(model))"
            )
        for _, layer, readers, _ in self._sites:
            transform, shift = (t.double() for t in layer.affine())
            for _, proj in readers:
                weight, bias = proj.weight_and_bias()
                wide = weight.double()
                bias += (wide @ shift).to(bias.dtype)
                weight.copy_((wide @ transform).to(weight.dtype))
