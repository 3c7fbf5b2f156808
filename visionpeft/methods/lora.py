"""LoRA (Hu et al., ICLR 2022) on any projection of any backbone, including Q/V-only inside a fused qkv, and DoRA
(Liu et al., ICML 2024) as its ``use_dora`` option."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..backbones.base import Projection
from ..backbones.module_paths import pattern_key
from ..errors import CheckpointError, ConfigError, IncompatibleMethodError
from ..layers.lora import LoRAConv2d, LoRALinear, LoRAMultiheadAttention
from ..schema import setting
from .base import ExportParts, Method, MethodConfig, base_module_paths, register_method
from .targets import check_targets, module_projections, projection_groups


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA options.

    Defaults follow the LoRA paper and the VTAB-1k setting of NOAH / V-PETL Bench: rank 8 on the query and value
    projections, ``alpha = r`` (scale 1, "we simply set alpha to the first r we try", Hu et al. 2022 sec. 4.1),
    no dropout. With these, ViT-B/16 trains 12 x 2 x (768 x 8 + 8 x 768) = 294,912 parameters.

    Attributes:
        r: Rank of the update.
        alpha: The update is scaled by ``alpha / r``.
        dropout: Dropout on the LoRA branch input (not available on ``nn.MultiheadAttention``).
        use_dora: DoRA (weight-decomposed LoRA, arXiv 2402.09353; PEFT's option name): each adapted projection also
            trains a magnitude per output row (``out_features`` parameters; a fused-qkv slice: its rows), the
            weight norm detached in the backward pass as in the paper (sec. 4.3) and PEFT.
        targets: Projections to adapt: any of ``q``, ``k``, ``v``, ``o``, ``fc1``, ``fc2``; on a U-Net also
            ``conv1``, ``conv2`` (resnet convs) and block-specific names such as ``attn2.k``.
        target_modules: Library modules to adapt instead, on any model, by PEFT's rule: a list of module-path
            suffixes (``["query", "value"]``) or one regex over the whole path. Each selected nn.Linear, nn.Conv2d
            or nn.MultiheadAttention (all four projections) gets one update; canonical names are module paths.
        rank_pattern: PEFT's option: module-path pattern -> the rank of the adapted modules it selects (the first
            key in order whose ``(.*\\.)?(KEY)$`` matches the library module's path, as ``peft.utils.other.
            get_pattern_key``); other modules get ``r``. A fused projection (timm's qkv) is one module: its slices
            share the rank.
        alpha_pattern: The same for ``alpha`` (a module matched by ``rank_pattern`` only keeps ``alpha``, as PEFT).
    """

    r: int = setting(8, "rank of the update", min=1)
    alpha: float = setting(8.0, "the update is scaled by alpha / r", above=0)
    dropout: float = setting(0.0, "dropout on the LoRA branch input", min=0, below=1)
    use_dora: bool = setting(False, "DoRA: also train a magnitude per output row (weight-decomposed LoRA)")
    targets: tuple[str, ...] = setting(("q", "v"), "projections to adapt (q, k, v, o, fc1, fc2, ...)", nonempty=True)
    target_modules: str | tuple[str, ...] | None = setting(
        None, "module paths to adapt instead of targets, on any model: path suffixes, or one regex (PEFT's rule)"
    )
    rank_pattern: dict[str, int] = setting(
        {}, "module-path pattern -> rank of the modules it selects (PEFT's rank_pattern: regex or dotted suffix)"
    )
    alpha_pattern: dict[str, float] = setting({}, "module-path pattern -> alpha (PEFT's alpha_pattern)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rank_pattern = checked_pattern(self.rank_pattern, "rank_pattern", int)
        self.alpha_pattern = checked_pattern(self.alpha_pattern, "alpha_pattern", float)


def checked_pattern(pattern: Any, option: str, kind: type) -> dict[str, Any]:
    """A ``rank_pattern`` / ``alpha_pattern`` as a plain dict of regex -> positive value.

    Raises:
        ConfigError: Not a mapping, a key that is no regex, or a value that is not a positive ``kind``.
    """
    if not isinstance(pattern, Mapping):
        raise ConfigError(f"method 'lora' option '{option}' must map module-path patterns to values, got {pattern!r}")
    checked = {}
    for key, value in pattern.items():
        try:
            re.compile(str(key))
        except re.error as err:
            raise ConfigError(f"method 'lora' option '{option}' key '{key}' is not a regex: {err}") from None
        whole = kind is float or (isinstance(value, int) and not isinstance(value, bool))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not whole or value <= 0:
            raise ConfigError(
                f"method 'lora' option '{option}' value of '{key}' must be a positive {kind.__name__}, got {value!r}"
            )
        checked[str(key)] = kind(value)
    return checked


#: Library modules a LoRA can wrap when chosen by module path.
LORA_MODULES = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)


@register_method
class LoRA(Method):
    name = "lora"
    config_class = LoRAConfig
    merges_exactly = True
    merge_priority = 0
    export_formats = frozenset({"peft", "diffusers", "kohya"})

    def check_fits(self) -> None:
        super().check_fits()
        cfg = self.config
        if cfg.target_modules is not None:
            self.modules_by_path(cfg.target_modules, LORA_MODULES)
            return
        check_targets(self, cfg.targets)

    def build(self) -> None:
        cfg = self.config
        if cfg.target_modules is not None:
            groups = [module_projections(*entry) for entry in self.modules_by_path(cfg.target_modules, LORA_MODULES)]
        else:
            groups = list(projection_groups(self.blocks(), cfg.targets))
        paths = base_module_paths(self.backbone.model)
        sizes = [self.rank_and_alpha(paths.get(id(members[0][1].layer), "")) for members in groups]
        for members, (r, alpha) in zip(groups, sizes, strict=True):
            self._wrap_group(members, r, alpha)

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """The rank and alpha of the library module at ``path``: ``rank_pattern`` / ``alpha_pattern``'s value of
        the first key that selects it (PEFT's rule, :func:`~visionpeft.backbones.module_paths.pattern_key`), else
        ``r`` / ``alpha``."""
        cfg = self.config
        rank_key, alpha_key = pattern_key(cfg.rank_pattern, path), pattern_key(cfg.alpha_pattern, path)
        r = cfg.r if rank_key is None else cfg.rank_pattern[rank_key]
        return r, cfg.alpha if alpha_key is None else cfg.alpha_pattern[alpha_key]

    def _wrap_group(self, members: list[tuple[str, Projection]], r: int, alpha: float) -> None:
        """Wraps the one library layer that ``members`` (canonical name, projection) are parts of with a LoRA of
        rank ``r`` scaled by ``alpha / r``."""
        cfg = self.config
        proj = members[0][1]
        layer = proj.layer
        if getattr(layer, "_vp_wrapper", False):
            raise IncompatibleMethodError(f"{members[0][0]} already carries a LoRA")
        if proj.kind == "conv" and layer.groups != 1:
            raise IncompatibleMethodError(f"{members[0][0]} is a grouped convolution; LoRA adapts groups=1 only")
        if proj.kind == "mha":
            if cfg.dropout > 0:
                raise IncompatibleMethodError(
                    "lora dropout is not supported on nn.MultiheadAttention (open_clip towers); set lora.dropout=0"
                )
            slot_names = {p.slot: n for n, p in members}
            wrapper = LoRAMultiheadAttention(layer, tuple(slot_names), r, alpha, cfg.use_dora)
        elif proj.kind == "conv":
            slot_names = {"update": members[0][0]}
            wrapper = LoRAConv2d(layer, r, alpha, cfg.dropout, cfg.use_dora)
        elif proj.kind == "fused":
            slot_names = {p.slot: n for n, p in members}
            rows = {p.slot: p.rows for _, p in members}
            wrapper = LoRALinear(layer, rows, r, alpha, cfg.dropout, cfg.use_dora)
        else:
            slot_names = {"main": members[0][0]}
            wrapper = LoRALinear(layer, {"main": (0, layer.out_features)}, r, alpha, cfg.dropout, cfg.use_dora)

        def canonical(pname: str) -> str:
            # updates.<slot>.lora_A (Linear / MHA) or update.lora_A (Conv2d)
            parts = pname.split(".")
            slot = parts[1] if parts[0] == "updates" else "update"
            return f"{slot_names[slot]}.{parts[-1]}"

        self.wrap(proj.parent, proj.attr, wrapper, canonical)

    def wrappers(self) -> list:
        return [getattr(parent, attr) for parent, attr, _ in self._wrapped]

    def merge(self) -> None:
        for wrapper in self.wrappers():
            wrapper.merge(1.0)

    def export_parts(self, format: str) -> ExportParts:
        """Each adapted library module's update as one LoRA ``(A, B)``, the scale folded into B; with DoRA also its
        magnitude vector in PEFT's ``lora_magnitude_vector`` shape.

        A LoRA on some slices of a fused projection (Q and V of timm's ``qkv``) is exactly one LoRA of rank
        ``slices x r`` on the whole projection: A stacks the slices' A matrices and B is block-diagonal, zero on the
        rows of the slices without an update (with DoRA their magnitude is their norm: scale 1, as here).

        Raises:
            CheckpointError: A LoRA on ``nn.MultiheadAttention`` (no file layout expresses it), or the diffusers
                format for a model that is no Stable Diffusion U-Net or pipeline.
        """
        paths = base_module_paths(self.backbone.model)
        parts = ExportParts()
        for wrapper in self.wrappers():
            path = paths[id(wrapper.base)]
            problem = self.backbone.export_problem(path, format)
            if problem:
                raise CheckpointError(problem)
            if isinstance(wrapper, LoRAMultiheadAttention):
                raise CheckpointError(
                    f"{path}: a LoRA on nn.MultiheadAttention (open_clip) has no PEFT / diffusers file layout; "
                    "save it with format='visionpeft'"
                )
            if format in ("diffusers", "kohya"):  # kohya: the diffusers layers, renamed by diffusers' converter
                group = self.backbone.diffusers_lora_group(path)
                if group is None:
                    raise CheckpointError(
                        f"the {format} LoRA format is for a Stable Diffusion U-Net or pipeline; "
                        f"this is {self.backbone.family}"
                    )
                path = ".".join(group)
            if isinstance(wrapper, LoRAConv2d):
                u = wrapper.update
                parts.lora_layers[path] = (u.lora_A.detach(), u.lora_B.detach() * u.scale)
                if wrapper.dora:  # PEFT keeps a conv's magnitude as (1, out_channels, 1, 1)
                    parts.magnitudes[path] = u.magnitude.detach().view(1, -1, 1, 1)
            else:
                parts.lora_layers[path] = tuple(t.detach() for t in wrapper.stacked())
                if wrapper.dora:
                    parts.magnitudes[path] = wrapper.magnitude_vector()
        return parts
