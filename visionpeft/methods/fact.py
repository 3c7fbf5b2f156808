"""FacT (Jie & Deng, AAAI 2023, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer"; official code
JieShibo/PETL-ViT ``FacT/fact_tt.py`` and ``FacT/fact_tk.py``).

The weight increments of every adapted projection of every block, stacked into one tensor, are factorised with
factors shared across layers: ``U`` (dim x D) maps a token of width D down, ``V`` (D x dim) maps it back up, and a
small core per projection mixes the ``dim`` channels in between. A projection whose input or output is a multiple
``m`` / ``n`` of D (the MLP's fc2 / fc1) is handled D channels at a time, as the official code reshapes the 4D
hidden layer into 4 tokens of width D, so its core is ``(n * dim) x (m * dim)``:

    delta W = scale * (I_n (x) V) K (I_m (x) U),   output += dropout-on-the-core-output path of the same product.

- ``tt`` (tensor train): each projection of each block has its own dense core (the official ``*_FacTs`` Linears).
- ``tk`` (Tucker): the cores are slices of one shared ``dim^3`` tensor ``C`` mixed by a ``dim x (blocks x 12)``
  factor ``P`` (12 columns per ViT block: q, k, v, o, fc1's 4 chunks, fc2's 4 chunks, in that order), reshaped as
  the official ``fact_forward_attn`` / ``fact_forward_mlp`` do.

Initialisation follows the official ``set_FacT``: ``U`` and the tt cores as ``nn.Linear`` weights, ``C`` and ``P``
Xavier-uniform, ``V`` zero, so the model is unchanged at initialisation; dropout 0.1 on the core output. The
increment is linear in the input, so ``merge`` folds it into the weights exactly. ViT-B/16 (head excluded): tt
dim 8 / 32 = 21,504 / 196,608, tk dim 16 / 32 / 64 = 30,976 / 86,528 / 369,664 (PETL_Vision's counts).

On ``nn.MultiheadAttention`` (open_clip's own towers: projections of kind ``mha``) the increments of q, k, v and o
are added to the attention's weights (:class:`FactorDelta` in a
:class:`~visionpeft.layers.weight_update.WeightSpaceMultiheadAttention`), where the core output's dropout has no
form: such a tower needs ``dropout=0``. Its MLP's Linears take the increment through the factors as timm's do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Projection
from ..errors import IncompatibleMethodError
from ..layers.narrow import narrow_linear
from ..layers.weight_update import WeightSpaceMultiheadAttention, WeightUpdate
from ..schema import setting
from .base import Method, MethodConfig, register_method

#: The projections FacT adapts in each block, in the official column order of the Tucker factor P.
FACT_PROJECTIONS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2")


@dataclass
class FacTConfig(MethodConfig):
    """FacT options (defaults: the official ``set_FacT(model, dim=8, s=1)``; its VTAB configs pick ``dim`` and
    ``scale`` per task).

    Attributes:
        variant: ``tt`` (tensor train: a dense core per projection) or ``tk`` (Tucker: cores from one shared tensor).
        dim: Rank of the factorisation (the width of the shared factors U and V).
        scale: The increment is multiplied by ``scale``.
        dropout: Dropout on the core's output (the official 0.1).
    """

    variant: str = setting("tt", "factorisation: tt (tensor train) or tk (Tucker)", choices=("tt", "tk"))
    dim: int = setting(8, "rank of the factorisation (width of the shared factors)", min=1)
    scale: float = setting(1.0, "the increment is multiplied by scale", above=0)
    dropout: float = setting(0.1, "dropout on the core output", min=0, below=1)


class FacTFactors(nn.Module):
    """The trainable tensors of one FacT: shared ``u`` (dim x D) and ``v`` (D x dim), and the cores.

    Args:
        width: Token width D. dim: Rank. variant: ``tt`` or ``tk``. dropout: Dropout on the core output.
        shapes: Projection key -> ``(n, m)``, its output and input widths in units of D, in the official order.
    """

    def __init__(self, width: int, dim: int, variant: str, dropout: float, shapes: dict[str, tuple[int, int]]):
        super().__init__()
        self.dim, self.variant, self.shapes = dim, variant, dict(shapes)
        self.u = nn.Parameter(torch.empty(dim, width))
        self.v = nn.Parameter(torch.zeros(width, dim))
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))  # nn.Linear(D, dim)'s initialisation
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if variant == "tt":
            self.cores = nn.ParameterDict()
            for key, (n, m) in shapes.items():
                self.cores[key] = nn.Parameter(torch.empty(n * dim, m * dim))
                nn.init.kaiming_uniform_(self.cores[key], a=math.sqrt(5))
            return
        self.columns: dict[str, tuple[int, int]] = {}
        total = 0
        for key, (n, m) in shapes.items():
            self.columns[key] = (total, total + n * m)
            total += n * m
        self.tucker_c = nn.Parameter(torch.empty(dim, dim, dim))
        self.tucker_p = nn.Parameter(torch.empty(dim, total))
        nn.init.xavier_uniform_(self.tucker_c)
        nn.init.xavier_uniform_(self.tucker_p)

    def core(self, key: str) -> torch.Tensor:
        """The ``(n * dim) x (m * dim)`` core of one projection."""
        return self.stacked_core([key])

    def stacked_core(self, keys: list[str]) -> torch.Tensor:
        """The cores of ``keys`` stacked row-wise; Tucker cores of consecutive columns of ``P`` come from one product
        with ``C`` (timm's q, k, v: one product instead of three)."""
        if self.variant == "tt":
            parts = [self.cores[key] for key in keys]
        else:
            spans = [self.columns[key] for key in keys]
            first, last = spans[0][0], spans[-1][1]
            if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
                return torch.cat([self.core(key) for key in keys])
            products = self.tucker_c @ self.tucker_p[:, first:last]  # (dim, dim, columns)
            parts = []
            for key, (start, stop) in zip(keys, spans):
                flat = products[..., start - first : stop - first].reshape(self.dim, -1)
                parts.append(flat if self.shapes[key][1] > 1 else flat.t())
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def increment(self, keys: list[str], x: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale * delta W x`` of the projections ``keys`` reading the same input ``x`` (timm's fused qkv: q, k, v),
        their outputs side by side, through the factors (never forming delta W).

        The projections share ``U``, so ``x`` is mapped down once and their cores run as one stacked matrix: one
        chain of three small matrix products for the whole layer instead of one per projection (the small products'
        count, not their size, is what they cost on a CPU). Dropout acts on the stacked core outputs.
        """
        m = self.shapes[keys[0]][1]
        n = sum(self.shapes[key][0] for key in keys)
        core = self.stacked_core(keys)
        low = F.linear(x.unflatten(-1, (m, -1)), self.u).flatten(-2)
        mixed = self.dropout(F.linear(low, core))
        return narrow_linear(mixed.unflatten(-1, (n, self.dim)), self.v).flatten(-2) * scale

    def delta_weight(self, key: str, scale: float) -> torch.Tensor:
        """``scale * delta W`` of the projection ``key``, shaped like its weight rows ``(n * D, m * D)``."""
        n, m = self.shapes[key]
        blocks = self.core(key).reshape(n, self.dim, m, self.dim)
        delta = torch.einsum("ca,jakb,bi->jcki", self.v, blocks, self.u)
        return delta.reshape(n * self.v.shape[0], m * self.u.shape[1]) * scale


class FactorDelta(WeightUpdate):
    """``scale * delta W`` of one projection of an ``nn.MultiheadAttention``, from the shared factors (held, not
    registered here: they are the method's parameters once, under ``fact``)."""

    additive = True

    def __init__(self, factors: FacTFactors, key: str, scale: float) -> None:
        super().__init__()
        self.key, self.scale = key, scale
        object.__setattr__(self, "factors", factors)  # no submodule: its parameters are not this update's

    def delta(self, weight: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return self.factors.delta_weight(self.key, self.scale)


@register_method
class FacT(Method):
    name = "fact"
    config_class = FacTConfig
    merges_exactly = True
    merge_priority = 0
    requires = {"tokens": "a ViT-style token tower (its width D)"}

    def adapted_projections(self) -> list[tuple[str, Projection]]:
        """``(key, projection)`` of every adapted projection, block by block in the official order."""
        found = []
        for index, block in enumerate(self.blocks()):
            missing = [p for p in FACT_PROJECTIONS if p not in block.projections]
            if missing:
                raise IncompatibleMethodError(
                    f"fact needs the projections {', '.join(FACT_PROJECTIONS)} in every block; "
                    f"{block.name} of the {self.backbone.family} '{self.tower.name}' tower lacks {', '.join(missing)}"
                )
            found += [(f"{index}.{p}", block.projections[p]) for p in FACT_PROJECTIONS]
        return found

    def check_fits(self) -> None:
        super().check_fits()
        if not self.blocks():
            raise IncompatibleMethodError(f"fact needs transformer blocks; the {self.backbone.family} model has none")
        blocks = [block.name for block in self.blocks()]
        for key, proj in self.adapted_projections():
            index, _, projection = key.partition(".")
            where = f"{self.tower.prefix}{blocks[int(index)]}.{projection}"
            if proj.kind == "mha":
                self.check_attention(where, proj)
            elif proj.kind not in ("linear", "fused"):
                raise IncompatibleMethodError(
                    f"fact adapts Linear projections and attentions; {where} of the {self.backbone.family} tower is "
                    f"a {proj.kind}"
                )
            self.widths(where, proj)

    def check_attention(self, where: str, proj: Projection) -> None:
        """An ``mha`` projection takes its increment in weight space, where the core output's dropout has no form,
        and only from this method."""
        if self.config.dropout > 0:
            raise IncompatibleMethodError(
                f"fact dropout acts on the core output, which has no weight-space form on {where} (an "
                "nn.MultiheadAttention); set fact.dropout=0"
            )
        if getattr(proj.layer, "_vp_wrapper", False):
            raise IncompatibleMethodError(
                f"fact cannot adapt {where}: another attached method ({type(proj.layer).__name__}) already rewrites "
                "the weights of that attention"
            )

    def widths(self, key: str, proj: Projection) -> tuple[int, int]:
        """``(n, m)``: the projection's output and input widths in units of the token width D."""
        d = self.tower.tokens.dim
        weight, _ = proj.weight_and_bias()
        out_features, in_features = weight.shape
        if out_features % d or in_features % d or min(out_features, in_features) != d:
            raise IncompatibleMethodError(
                f"fact needs projections of D x kD or kD x D (D = {d}); {key} is {out_features} x {in_features}"
            )
        return out_features // d, in_features // d

    def build(self) -> None:
        cfg = self.config
        projections = self.adapted_projections()
        shapes = {key.replace(".", "_"): self.widths(key, proj) for key, proj in projections}
        factors = FacTFactors(self.tower.tokens.dim, cfg.dim, cfg.variant, cfg.dropout, shapes)
        self.factors = self.add_module(self.blocks()[0].module, f"{self.tower.prefix}fact", factors)
        layers: dict[int, tuple[nn.Module, list]] = {}
        attentions: dict[int, tuple[Projection, dict[str, WeightUpdate]]] = {}
        for key, proj in projections:
            if proj.kind == "mha":
                entry = attentions.setdefault(id(proj.base_layer()), (proj, {}))
                entry[1][proj.slot] = FactorDelta(factors, key.replace(".", "_"), cfg.scale)
                continue
            layer = proj.base_layer()
            rows = proj.rows or (0, layer.out_features)
            layers.setdefault(id(layer), (layer, []))[1].append((rows, key.replace(".", "_")))
        for layer, slices in layers.values():
            self.hook_output(layer, self.add_increment, sorted(slices))
        for proj, updates in attentions.values():  # no parameters of their own: no canonical names to give
            self.wrap(proj.parent, proj.attr, WeightSpaceMultiheadAttention(proj.layer, updates), str)

    def add_increment(self, slices: list, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """Adds the increments of the layer's slices to their output rows; slices that follow each other without a
        gap share one :meth:`FacTFactors.increment` call, rows no slice covers get zero."""
        x, parts, end = inputs[0], [], 0
        runs: list[tuple[int, int, list[str]]] = []  # (start, stop, keys) of gapless runs of slices
        for (start, stop), key in slices:
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], stop, runs[-1][2] + [key])
            else:
                runs.append((start, stop, [key]))
        for start, stop, keys in runs:
            if start > end:
                parts.append(x.new_zeros(*x.shape[:-1], start - end))
            parts.append(self.factors.increment(keys, x, self.config.scale))
            end = stop
        if end < output.shape[-1]:
            parts.append(x.new_zeros(*x.shape[:-1], output.shape[-1] - end))
        return output + (torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])

    @torch.no_grad()
    def merge(self) -> None:
        for key, proj in self.adapted_projections():
            weight, _ = proj.weight_and_bias()
            weight += self.factors.delta_weight(key.replace(".", "_"), self.config.scale).to(weight.dtype)
