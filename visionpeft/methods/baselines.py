"""Baselines that train tensors the backbone already has: BitFit, linear probe, full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import IncompatibleMethodError
from ..registry import METHODS
from .base import ExportParts, Method, MethodConfig


class _InPlace(Method):
    """A method training backbone parameters in place; merging it is a no-op (the weights already hold it)."""

    merges_exactly = True
    merge_priority = 0

    def merge(self) -> None:
        self._originals = {}


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit (Ben Zaken et al., ACL 2022): every bias term of the tower (LayerNorm biases included, as the
    reference code selects all parameters named ``*bias``). ViT-B/16: 102,912 parameters."""


@METHODS.register("bitfit")
class BitFit(_InPlace):
    name = "bitfit"
    config_class = BitFitConfig

    def build(self) -> None:
        for name, owner, attr in self.tower_parameters():
            if attr.endswith("bias"):
                self.train_in_place(name, owner, attr)


@dataclass
class LinearConfig(MethodConfig):
    """Linear probe: only the task head trains."""


@METHODS.register("linear")
class LinearProbe(_InPlace):
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
    """Full fine-tuning: every parameter of the tower trains."""


@METHODS.register("full")
class FullFineTuning(_InPlace):
    name = "full"
    config_class = FullConfig

    def build(self) -> None:
        for name, owner, attr in self.tower_parameters():
            self.train_in_place(name, owner, attr)
