"""LayerNorm tuning: only the affine parameters of the tower's LayerNorms train (with the head).

The "LN tuning" baseline of the vision PETL benchmarks (PETL_Vision's ``ln`` method): every LayerNorm of the tower,
the final norm included, trains its weight and bias in place, as BitFit trains biases. ViT-B/16:
12 blocks x 2 norms x 2 x 768 + the final norm's 2 x 768 = 38,400 parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import IncompatibleMethodError
from .base import MethodConfig, register_method
from .baselines import InPlaceMethod


@dataclass
class LNTuneConfig(MethodConfig):
    """LayerNorm tuning has no options of its own: every LayerNorm's weight and bias in the tower trains."""


@register_method
class LNTune(InPlaceMethod):
    name = "ln_tune"
    config_class = LNTuneConfig

    def layer_norm_parameters(self) -> list[tuple[str, nn.Module, str]]:
        """``(name, owner, attr)`` of the affine parameters of every LayerNorm in the tower."""
        return [entry for entry in self.tower_parameters() if isinstance(entry[1], nn.LayerNorm)]

    def check_fits(self) -> None:
        super().check_fits()
        if not self.layer_norm_parameters():
            raise IncompatibleMethodError(
                f"ln_tune needs LayerNorms with affine parameters; the {self.backbone.family} "
                f"'{self.tower.name}' tower has none"
            )

    def build(self) -> None:
        for name, owner, attr in self.layer_norm_parameters():
            self.train_in_place(name, owner, attr)
