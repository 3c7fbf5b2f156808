"""What LoHa, LoKr, OFT and BOFT share: the projections they change (``targets`` / ``target_modules``, as LoRA), one
weight-space wrapper per library layer (:mod:`visionpeft.layers.weight_update`), the exact merge and PEFT's folder.

Where the change goes:

- ``target_modules`` (PEFT's rule: path suffixes or one regex) wraps each selected Linear / Conv2d as one module,
  exactly as PEFT does: ``target_modules=["qkv"]`` on timm's ViT adapts the fused qkv as one 3d x d weight, and
  PEFT's folder holds it. An ``nn.MultiheadAttention`` (open_clip) is its four projections, each its own update.
- ``targets`` (canonical names) adapts the chosen projections of every block: on timm's fused qkv, ``q`` and ``v``
  are two slices of its rows, each with its own factors (K rows unchanged), as LoRA's Q / V. PEFT adapts whole
  modules only, so such slices have no PEFT folder (one line says so).

Each method states its options in its config (PEFT's names and defaults), builds the :class:`WeightUpdate` of a slice
(:meth:`WeightSpaceMethod.new_update`) and names its PEFT tensors and config. A method LyCORIS also has
(``kohya`` in its ``export_formats``) names its tensors in LyCORIS's layout too (:meth:`lycoris_tensors`), which
kohya / A1111 / ComfyUI files hold (written by :mod:`visionpeft.checkpoint.lycoris`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import CheckpointError, IncompatibleMethodError
from ..layers.weight_update import WeightSpaceLayer, WeightSpaceMultiheadAttention, WeightUpdate
from ..schema import setting
from .base import ExportParts, Method, MethodConfig, base_module_paths
from .targets import LayerGroup, check_targets, module_projections, projection_groups


@dataclass
class WeightSpaceConfig(MethodConfig):
    """Where a LyCORIS-family method goes (the methods' configs add their own options).

    Attributes:
        targets: Projections to adapt: any of ``q``, ``k``, ``v``, ``o``, ``fc1``, ``fc2``; on a U-Net also
            ``conv1``, ``conv2`` and block-specific names such as ``attn2.k``. Q / V of a fused qkv are slices with
            their own factors. visionpeft's default (PEFT has none for timm models): ``q``, ``v``.
        target_modules: Library modules to adapt instead, on any model, by PEFT's rule: module-path suffixes
            (``["qkv", "fc1"]``) or one regex. Each nn.Linear / nn.Conv2d is one module, as in PEFT;
            nn.MultiheadAttention is its four projections.
    """

    targets: tuple[str, ...] = setting(("q", "v"), "projections to adapt (q, k, v, o, fc1, fc2, ...)", nonempty=True)
    target_modules: str | tuple[str, ...] | None = setting(
        None, "module paths to adapt instead of targets, on any model: path suffixes, or one regex (PEFT's rule)"
    )


#: The PEFT release whose layers these methods equal, written into PEFT's config (``peft_version``: PEFT reads
#: OFT's Cayley-Neumann form by it).
PEFT_VERSION = "0.21.0"

#: Library modules the methods adapt when chosen by module path.
WEIGHT_SPACE_MODULES = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)


def input_side(layer: nn.Module, weight: torch.Tensor) -> int:
    """The size of a weight's input side: a Linear's in_features, a conv's in_channels / groups x kh x kw."""
    return weight[0].numel() if isinstance(layer, nn.Conv2d) else weight.shape[1]


class WeightSpaceMethod(Method):
    """Base of the methods that change layer weights through :class:`WeightUpdate` s.

    Subclasses set ``name``, ``config_class``, ``peft_type``, ``peft_fields`` and ``peft_fixed`` and implement
    :meth:`new_update` (and :meth:`peft_tensors` where PEFT's names differ from the parameters').
    """

    merges_exactly = True
    export_formats = frozenset({"peft"})
    #: PEFT's name of the adapter type (``peft_type`` in ``adapter_config.json``).
    peft_type: ClassVar[str] = ""
    #: Config fields written to ``adapter_config.json`` under the same names (the options share PEFT's names).
    peft_fields: ClassVar[tuple[str, ...]] = ()
    #: PEFT's other ``adapter_config.json`` entries, fixed for every config of the method.
    peft_fixed: ClassVar[dict[str, Any]] = {}

    def new_update(self, name: str, weight: torch.Tensor, layer: nn.Module) -> WeightUpdate:
        """The update of the slice ``name`` whose frozen weight is ``weight`` (its shape is what counts; it may live
        on the meta device), a part of the library ``layer`` (Linear, Conv2d or nn.MultiheadAttention).

        Raises:
            ConfigError / IncompatibleMethodError: The options do not fit this slice (one line naming it).
        """
        raise NotImplementedError

    def peft_options(self) -> dict[str, Any]:
        """The method's fields of PEFT's ``adapter_config.json`` (besides ``peft_type`` and ``target_modules``)."""
        return {**{name: getattr(self.config, name) for name in self.peft_fields}, **self.peft_fixed}

    def peft_tensors(self, update: WeightUpdate, layer: nn.Module) -> dict[str, torch.Tensor]:
        """The update's tensors under PEFT's names (relative to the layer): its parameters as they are."""
        return {name: parameter.detach() for name, parameter in update.named_parameters()}

    def lycoris_tensors(self, update: WeightUpdate, layer: nn.Module) -> dict[str, torch.Tensor]:
        """The update's tensors in LyCORIS's layout (relative to the layer), ``alpha`` included: readers scale the
        update by ``alpha / rank``, the rank read off the factors. Default: the PEFT tensors (LoHa's and LoKr's names
        and shapes are LyCORIS's) and the config's alpha."""
        return {**self.peft_tensors(update, layer), "alpha": torch.tensor(float(self.config.alpha))}

    def check_fits(self) -> None:
        super().check_fits()
        cfg = self.config
        if cfg.target_modules is not None:
            self.modules_by_path(cfg.target_modules, WEIGHT_SPACE_MODULES)
        else:
            check_targets(self, cfg.targets)

    def build(self) -> None:
        cfg = self.config
        if cfg.target_modules is not None:
            groups = [module_projections(*e) for e in self.modules_by_path(cfg.target_modules, WEIGHT_SPACE_MODULES)]
        else:
            groups = list(projection_groups(self.blocks(), cfg.targets))
        for members in groups:
            self._wrap_group(members)

    def _wrap_group(self, members: LayerGroup) -> None:
        """Wraps the one library layer that ``members`` (canonical name, projection) are parts of."""
        proj = members[0][1]
        layer = proj.layer
        if getattr(layer, "_vp_wrapper", False):
            raise IncompatibleMethodError(
                f"{members[0][0]} is already wrapped by another attached method; {self.name} adapts layers no other "
                "weight method wraps"
            )
        slot_of = {name: p.slot if p.kind in ("mha", "fused") else "main" for name, p in members}
        updates = {slot_of[name]: self.new_update(name, p.weight_and_bias()[0], layer) for name, p in members}
        if proj.kind == "mha":
            wrapper: nn.Module = WeightSpaceMultiheadAttention(layer, updates)
        else:
            rows = {slot_of[name]: p.rows or (0, layer.weight.shape[0]) for name, p in members}
            wrapper = WeightSpaceLayer(layer, rows, updates)
        canonical_of = {slot: name for name, slot in slot_of.items()}

        def canonical(pname: str) -> str:  # updates.<slot>.<factor>
            _, slot, factor = pname.split(".", 2)
            return f"{canonical_of[slot]}.{factor}"

        self.wrap(proj.parent, proj.attr, wrapper, canonical)

    def wrappers(self) -> list[nn.Module]:
        return [getattr(parent, attr) for parent, attr, _ in self._wrapped]

    def merge(self) -> None:
        for wrapper in self.wrappers():
            wrapper.merge()

    def export_parts(self, format: str) -> ExportParts:
        """Each adapted module's factors under PEFT's keys and PEFT's config of the adapter type (``peft``), or in
        LyCORIS's layout under ``<pipeline component>.<module path>.<LyCORIS name>`` (``kohya``: ``alpha`` included,
        no config; :mod:`visionpeft.checkpoint.lycoris` names the modules as kohya files do).

        Raises:
            CheckpointError: An nn.MultiheadAttention or Q / V slices of a fused projection (PEFT and LyCORIS adapt
                whole Linear and Conv2d modules), a module the backbone says the library would not reach, or the
                kohya format for a model that is no Stable Diffusion U-Net or pipeline.
        """
        paths = base_module_paths(self.backbone.model)
        parts, targets = ExportParts(), []
        for wrapper in self.wrappers():
            path = paths[id(wrapper.base)]
            problem = self.backbone.export_problem(path, format)
            if problem:
                raise CheckpointError(problem)
            key_prefix = path
            if format == "kohya":
                group = self.backbone.diffusers_lora_group(path)
                if group is None:
                    raise CheckpointError(
                        f"the kohya format is for a Stable Diffusion U-Net or pipeline; this is {self.backbone.family}"
                    )
                key_prefix = ".".join(group)
            if isinstance(wrapper, WeightSpaceMultiheadAttention):
                raise CheckpointError(
                    f"{path}: PEFT's {self.peft_type} adapts Linear and Conv2d modules, not nn.MultiheadAttention "
                    "(open_clip); save with format='visionpeft'"
                )
            if not wrapper.whole:
                leaf = path.rpartition(".")[2]
                raise CheckpointError(
                    f"{path}: a {self.name} on its {' / '.join(wrapper.slices)} slices has no PEFT layout (PEFT adapts "
                    f"whole modules); attach with target_modules=['{leaf}'] for a PEFT folder, or save with "
                    "format='visionpeft'"
                )
            named = self.lycoris_tensors if format == "kohya" else self.peft_tensors
            for name, tensor in named(wrapper.updates["main"], wrapper.base).items():
                parts.adapter_tensors[f"{key_prefix}.{name}"] = tensor
            targets.append(path)
        if format == "kohya":
            return parts
        parts.adapter_config = {
            "peft_type": self.peft_type,
            **self.peft_options(),
            "target_modules": sorted(targets),
            "peft_version": PEFT_VERSION,
        }
        return parts
