"""(IA)^3 (Liu et al., NeurIPS 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv 2205.05638): learned vectors that rescale the keys, the values and the feed-forward's inner
activation, ``l_k * (W_k x)``, ``l_v * (W_v x)`` and ``W_2 (l_ff * gelu(W_1 x))``, initialised to ones.

Official code: r-three/t-few ``src/models/lora.py`` (commit 114dece; ``LoRALinear`` with ``scaling_rank=1``,
``rank=0``: ``multi_lora_b`` ones, lines 22-31, multiplying the output, lines 34-42) on the modules of
``configs/ia3.json`` (``k``, ``v`` and T5's ``wi_1``, whose output is the linear half of the gated activation). PEFT
(``peft.tuners.ia3``) does the same per module: one vector on a target's output, or on its input for the targets it
calls ``feedforward_modules`` (for a GELU MLP the fc2 input is the activation the paper scales); this method equals
PEFT's layers on the same modules, its options carry PEFT's names.

A vector on a Linear or Conv2d is a forward hook (output) or pre-hook (input) of the layer; on the q / k / v rows of
timm's fused ``qkv`` it scales those rows only (q's rows keep 1; PEFT on ``qkv`` scales all of them); on open_clip's
``nn.MultiheadAttention`` it scales the rows (or input columns) of the projection's slice of ``in_proj_weight`` /
``in_proj_bias`` or ``out_proj`` in weight space. :meth:`IA3.merge` folds each vector into its layer exactly, before
or after another method's additive update of the same layer by attach order (:mod:`.hook_order`). PEFT's folder
(``format="peft"``, and beside visionpeft's files by default) holds every vector but those on nn.MultiheadAttention.

No ``format="kohya"`` (LyCORIS layout), and LyCORIS (IA)^3 files are not imported: LyCORIS's ``ia3`` module
(lycoris-lora ``lycoris/modules/ia3.py``: ``<module>.weight``, one value per channel, and ``<module>.on_input``) and
A1111's reader (``extensions-builtin/Lora/network_ia3.py``) scale the *weight* by ``1 + w`` and leave the bias alone,
where PEFT's vector is the scale itself and scales an output's bias too (exact in that layout only for input scales and
bias-free layers), and lycoris-lora 4.1.3's own loader reads no such file (``get_module`` hands
``IA3Module.make_module_from_state_dict`` both tensors, which takes one: a ``TypeError``), so no file could be
checked against lycoris-lora as the other formats are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..backbones.base import Projection
from ..errors import CheckpointError, ConfigError, IncompatibleMethodError
from ..layers.ia3 import IA3MultiheadAttention, IA3Vector, row_vector, scale_channels, scaled_weight
from ..schema import setting
from .base import ExportParts, Method, MethodConfig, base_module_paths, register_method
from .hook_order import HookSite, site_order
from .targets import check_targets, module_projections, projection_groups

#: Library modules (IA)^3 scales when chosen by module path.
IA3_MODULES = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)


@dataclass
class IA3Config(MethodConfig):
    """(IA)^3 options, under PEFT's names (``IA3Config``).

    The default targets are the paper's: the keys, the values and the MLP's inner activation (the fc2 input) of every
    block. PEFT has no default for ViTs or timm models (its table covers transformers language models; for BERT it is
    the same choice, ``key``, ``value``, ``output.dense`` as a feed-forward module). On ViT-B/16: 12 x (768 + 768 +
    3,072) = 55,296 parameters; PEFT's ``target_modules=["qkv", "fc2"]`` (all three q / k / v rows) has 64,512.

    Attributes:
        targets: Projections to scale: any of ``q``, ``k``, ``v``, ``o``, ``fc1``, ``fc2`` (on a U-Net also
            ``conv1``, ``conv2`` and names such as ``attn2.k``). ``k`` / ``v`` of timm's fused qkv scale those rows.
        target_modules: Library modules to scale instead, on any model, by PEFT's rule: a list of module-path suffixes
            or one regex over the whole path. Each selected nn.Linear / nn.Conv2d gets one vector, an
            nn.MultiheadAttention one per projection (``<path>.q`` ... ``<path>.o``).
        feedforward_modules: The targets whose input is scaled instead of their output (PEFT's option and rule: a
            list, each of which must be a target too, or one regex). None: with ``targets``, ``fc2`` (the paper's
            ``l_ff``); with ``target_modules``, none.
        init_ia3_weights: Initialise the vectors to ones (the model starts unchanged); False draws them from a
            standard normal, as PEFT does.
    """

    targets: tuple[str, ...] = setting(
        ("k", "v", "fc2"), "projections to scale (q, k, v, o, fc1, fc2, ...)", nonempty=True
    )
    target_modules: str | tuple[str, ...] | None = setting(
        None, "module paths to scale instead of targets, on any model: path suffixes, or one regex (PEFT's rule)"
    )
    feedforward_modules: str | tuple[str, ...] | None = setting(
        None, "targets whose input is scaled instead of their output; null: fc2 with targets, none with target_modules"
    )
    init_ia3_weights: bool = setting(True, "initialise the vectors to ones (False: standard normal, as PEFT)")

    def __post_init__(self) -> None:
        """Checks PEFT's rule as PEFT does: a list of feed-forward modules is a subset of a list of targets."""
        super().__post_init__()
        given = self.feedforward_modules
        option, chosen = (
            ("target_modules", self.target_modules) if self.target_modules is not None else ("targets", self.targets)
        )
        if given is None or isinstance(given, str) or isinstance(chosen, str):
            return
        outside = [name for name in given if name not in chosen]
        if outside:
            raise ConfigError(
                f"method 'ia3' option 'feedforward_modules' names {outside[0]!r}, which is not one of its {option} "
                f"{list(chosen)}; a feed-forward module is a target whose input is scaled"
            )


def peft_feedforward(path: str, spec: str | tuple[str, ...]) -> bool:
    """PEFT's test of whether the module at ``path`` is a feed-forward one
    (``IA3Model._check_target_module_feedforward``): one string is a regex the whole path must match; a list holds
    strings the path ends with (no dot needed, unlike the targets' rule)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path.endswith(name) for name in spec)


def canonical_feedforward(name: str, spec: str | tuple[str, ...]) -> bool:
    """Whether the projection with canonical ``name`` (``blocks.3.mlp.fc2``) is a feed-forward one: a list holds
    target names (equal to the name's projection part or its last parts, as targets select), one string is a regex
    over the whole name."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith("." + t) for t in spec)


@dataclass
class ScaledLayer:
    """The vectors on one library layer.

    Attributes:
        members: ``(canonical name, projection)`` of the layer's scaled parts (q / k / v of a fused qkv, an attention's
            slots, or the layer itself).
        feedforward: Canonical name -> whether that part's input is scaled.
    """

    members: list[tuple[str, Projection]]
    feedforward: dict[str, bool] = field(default_factory=dict)


@register_method
class IA3(Method):
    name = "ia3"
    config_class = IA3Config
    merges_exactly = True
    export_formats = frozenset({"peft"})

    def check_fits(self) -> None:
        super().check_fits()
        self._layers = self._plan()
        for layer in self._layers:
            self._check_layer(layer)

    def _plan(self) -> list[ScaledLayer]:
        """The layers to scale, with which parts are feed-forward ones (before anything is changed)."""
        cfg = self.config
        spec = cfg.feedforward_modules
        if cfg.target_modules is not None:
            layers = [
                ScaledLayer(module_projections(*entry))
                for entry in self.modules_by_path(cfg.target_modules, IA3_MODULES)
            ]
            for layer in layers:  # an attention's four parts share its path: its input is theirs
                path = layer.members[0][0].rpartition(".")[0] if layer.members[0][1].kind == "mha" else None
                for name, _ in layer.members:
                    layer.feedforward[name] = spec is not None and peft_feedforward(path or name, spec)
        else:
            check_targets(self, cfg.targets)
            spec = ("fc2",) if spec is None else spec
            layers = [ScaledLayer(members) for members in projection_groups(self.blocks(), cfg.targets)]
            for layer in layers:
                for name, _ in layer.members:
                    layer.feedforward[name] = canonical_feedforward(name, spec)
        if cfg.feedforward_modules and not any(any(layer.feedforward.values()) for layer in layers):
            option = "target_modules" if cfg.target_modules is not None else "targets"
            hint = "; one string is a regex over the whole name, a list holds names" if isinstance(spec, str) else ""
            raise ConfigError(
                f"ia3 feedforward_modules {cfg.feedforward_modules!r} selects none of the modules its {option} "
                f"select (e.g. {layers[0].members[0][0]}){hint}"
            )
        return layers

    def _check_layer(self, layer: ScaledLayer) -> None:
        name, proj = layer.members[0]
        if proj.kind == "mha":
            if getattr(proj.layer, "_vp_wrapper", False):
                raise IncompatibleMethodError(
                    f"ia3 cannot scale {name}: another method ({type(proj.layer).__name__}) already rewrites the "
                    "weights of that nn.MultiheadAttention"
                )
            return
        if isinstance(proj.parent, nn.MultiheadAttention):
            raise IncompatibleMethodError(
                f"ia3 cannot scale {name}: nn.MultiheadAttention reads its out_proj weight without calling it; "
                "select the attention module itself"
            )
        if getattr(proj.parent, "q_bias", None) is not None and proj.attr == "qkv":
            raise IncompatibleMethodError(
                f"ia3 needs the qkv output; {name} has its q/v biases added outside the qkv Linear (EVA)"
            )
        if proj.kind == "fused" and any(layer.feedforward.values()):
            fed = next(n for n, ff in layer.feedforward.items() if ff)
            raise IncompatibleMethodError(
                f"ia3 cannot scale the input of {fed} alone: it is a slice of the fused {proj.attr} Linear whose "
                f"input the other slices share; scale the whole layer with target_modules"
            )

    def build(self) -> None:
        ones = self.config.init_ia3_weights
        # (hook, library layer, its vector or its output pieces (rows, vector), feed-forward)
        self._sites: list[tuple[HookSite, nn.Module, IA3Vector | list, bool]] = []
        self._attentions: list[IA3MultiheadAttention] = []
        for layer in self._layers:
            if layer.members[0][1].kind == "mha":
                self._wrap_attention(layer, ones)
            else:
                self._hook_layer(layer, ones)

    def _wrap_attention(self, layer: ScaledLayer, ones: bool) -> None:
        proj = layer.members[0][1]
        names = {p.slot: n for n, p in layer.members}
        wrapper = IA3MultiheadAttention(proj.layer, {p.slot: layer.feedforward[n] for n, p in layer.members}, ones)
        self.wrap(proj.parent, proj.attr, wrapper, lambda pname: f"{names[pname.split('.')[1]]}.ia3_l")
        self._attentions.append(wrapper)

    def _hook_layer(self, layer: ScaledLayer, ones: bool) -> None:
        """Scales a Linear / Conv2d through hooks on the module now at its place (the layer or a wrapper of it); the
        vectors live on the library layer itself, so they stay in the model whatever wraps it later."""
        first = layer.members[0][1]
        hooked, base = first.layer, first.base_layer()
        conv = isinstance(base, nn.Conv2d)
        width_in = base.in_channels if conv else base.in_features
        width_out = base.out_channels if conv else base.out_features
        pieces = []
        for name, proj in layer.members:
            if layer.feedforward[name]:
                vector = self.add_module(base, name, IA3Vector(width_in, ones))
                self.hook_input(hooked, self._scale_input, vector, conv)
                self._sites.append((HookSite(name, hooked, self._hooks[-1].id, pre=True), base, vector, True))
            else:
                rows = proj.rows if proj.kind == "fused" else None
                width = rows[1] - rows[0] if rows else width_out
                pieces.append((rows, self.add_module(base, name, IA3Vector(width, ones))))
        if pieces:
            self.hook_output(hooked, self._scale_output, pieces, width_out, conv)
            self._sites.append((HookSite(layer.members[0][0], hooked, self._hooks[-1].id), base, pieces, False))

    @staticmethod
    def _scale_input(vector: IA3Vector, conv: bool, module: nn.Module, args: tuple) -> tuple:
        return (scale_channels(args[0], vector.ia3_l, conv), *args[1:])

    @staticmethod
    def _scale_output(pieces: list, width: int, conv: bool, module: nn.Module, args: tuple, output: torch.Tensor):
        return scale_channels(output, row_vector(width, pieces), conv)

    @property
    def merge_priority(self) -> float:  # type: ignore[override]
        """Inside another method's additive update of the same layer (attached after it) the vectors fold after that
        update, on a bare layer (updated later or never) before it (:mod:`.hook_order`); where no order is exact,
        first, so that :meth:`merge` refuses before any other method has merged."""
        return site_order(self.backbone.model, (site for site, *_ in self._sites)).merge_priority

    def merge(self) -> None:
        site_order(self.backbone.model, (site for site, *_ in self._sites)).check_foldable(self.name)
        with torch.no_grad():
            for _, base, scales, feedforward in self._sites:
                if feedforward:
                    vector = scales.ia3_l
                else:
                    vector = row_vector(base.weight.shape[0], scales)
                weight, bias = scaled_weight(base.weight, base.bias, vector, feedforward, getattr(base, "groups", 1))
                base.weight.copy_(weight)
                if bias is not None:
                    base.bias.copy_(bias)
            for attention in self._attentions:
                attention.merge()
        self._originals = {}

    def export_parts(self, format: str) -> ExportParts:
        """Each scaled module's vector under PEFT's key (``<path>.ia3_l``) and shape ((out, 1) on a Linear's output,
        (1, in) on its input, (1, channels, 1, 1) on a Conv2d), and PEFT's ``IA3`` config. Vectors on the k / v rows
        of a fused qkv are PEFT's one vector over all its rows, 1 on the others.

        Raises:
            CheckpointError: A vector on nn.MultiheadAttention (PEFT's IA3 has no layer for it), or a module the
                backbone says PEFT would not reach.
        """
        if self._attentions:
            raise CheckpointError(
                "PEFT's IA3 scales Linear and Conv2d modules, not nn.MultiheadAttention (open_clip); "
                "save with format='visionpeft'"
            )
        paths = base_module_paths(self.backbone.model)
        parts, feedforward = ExportParts(), []
        for _, base, scales, is_feedforward in self._sites:
            path = paths[id(base)]
            problem = self.backbone.export_problem(path, format)
            if problem:
                raise CheckpointError(problem)
            vector = scales.ia3_l if is_feedforward else row_vector(base.weight.shape[0], scales)
            if isinstance(base, nn.Conv2d):
                shape = (1, -1, 1, 1)
            else:
                shape = (1, -1) if is_feedforward else (-1, 1)
            parts.adapter_tensors[f"{path}.ia3_l"] = vector.detach().reshape(shape)
            if is_feedforward:
                feedforward.append(path)
        targets = sorted(key.removesuffix(".ia3_l") for key in parts.adapter_tensors)
        parts.adapter_config = {
            "peft_type": "IA3",
            "target_modules": targets,
            "feedforward_modules": peft_feedforward_spec(targets, feedforward),
            "exclude_modules": None,
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
        }
        return parts


def peft_feedforward_spec(targets: list[str], feedforward: list[str]) -> list[str] | str:
    """PEFT's ``feedforward_modules`` selecting exactly ``feedforward`` among the module paths ``targets``: their
    list, unless PEFT's rule (a path ending with an entry, no dot needed) would also take another target (a path
    ending in ``xblocks.0.mlp.fc2`` beside ``blocks.0.mlp.fc2``); then one regex of the paths."""
    chosen = sorted(feedforward)
    if all(peft_feedforward(path, tuple(chosen)) == (path in feedforward) for path in targets):
        return chosen
    return "|".join(re.escape(path) for path in chosen)
