"""Baselines that train tensors the backbone already has: BitFit, linear probe, full fine-tuning."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import IncompatibleMethodError
from ..schema import setting
from .base import ExportParts, Method, MethodConfig, register_method

logger = logging.getLogger(__name__)


class InPlaceMethod(Method):
    """A method training backbone parameters in place; merging it is a no-op (the weights already hold it)."""

    merges_exactly = True
    merge_priority = 0

    def merge(self) -> None:
        self._originals = {}

    def selected_parameters(self):
        """The tower's parameters, only those inside the modules ``target_modules`` selects when it is set."""
        spec = getattr(self.config, "target_modules", None)
        if spec is None:
            yield from self.tower_parameters()
            return
        prefixes = tuple(path + "." for path, *_ in self.modules_by_path(spec))
        for name, owner, attr in self.tower_parameters():
            if name.startswith(prefixes):
                yield name, owner, attr


TARGET_MODULES_HELP = "only inside these modules: path suffixes or one regex (PEFT's target_modules rule); null: all"


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit (Ben Zaken et al., ACL 2022): every bias term of the tower (LayerNorm biases included, as the
    reference code selects all parameters named ``*bias``). ViT-B/16: 102,912 parameters.

    Attributes:
        target_modules: Train only the biases inside these modules (any model; module-path suffixes or a regex).
    """

    target_modules: str | tuple[str, ...] | None = setting(None, TARGET_MODULES_HELP)


@register_method
class BitFit(InPlaceMethod):
    name = "bitfit"
    config_class = BitFitConfig

    def build(self) -> None:
        for name, owner, attr in self.selected_parameters():
            if attr.endswith("bias"):
                self.train_in_place(name, owner, attr)


@dataclass
class LinearConfig(MethodConfig):
    """Linear probe: only the task head trains."""


@register_method
class LinearProbe(InPlaceMethod):
    name = "linear"
    config_class = LinearConfig
    export_formats = frozenset({"peft"})  # as the head, PEFT's modules_to_save

    def check_fits(self) -> None:
        super().check_fits()
        if not self.backbone.heads():
            raise IncompatibleMethodError(
                f"linear needs a classification head; the {self.backbone.family} model has none "
                "(for timm, create it with num_classes > 0)"
            )

    def build(self) -> None:
        """Nothing to add: the head is trainable with every method."""

    def export_parts(self, format: str) -> ExportParts:
        return ExportParts(head=True)


@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning: every parameter of the tower trains.

    Attributes:
        keep_original: Keep a copy of the pretrained tower so that ``detach`` restores it bit for bit. Off by
            default: the copy is a second model in memory (0.34 GB for ViT-B, 3.4 GB for an SD U-Net), and a fully
            fine-tuned model is rarely detached; without it ``detach`` leaves the trained weights and says so.
        target_modules: Train only the parameters inside these modules (module-path suffixes or a regex).
    """

    keep_original: bool = setting(False, "keep a copy of the pretrained tower so detach restores it (a 2nd model)")
    target_modules: str | tuple[str, ...] | None = setting(None, TARGET_MODULES_HELP)


@register_method
class FullFineTuning(InPlaceMethod):
    name = "full"
    config_class = FullConfig

    def build(self) -> None:
        for name, owner, attr in self.selected_parameters():
            self.train_in_place(name, owner, attr, keep_original=self.config.keep_original)

    def detach(self) -> None:
        if self.tensors and not self.config.keep_original:
            logger.warning(
                "full fine-tuning kept no copy of the pretrained weights (full.keep_original=false): detach leaves "
                "the tower's current weights in place"
            )
        super().detach()
