"""Sequential bottleneck adapters: Houlsby et al. 2019 ("Parameter-Efficient Transfer Learning for NLP"; official
code google-research/adapter-bert ``modeling.py``) after the attention and after the MLP of every block, and
Pfeiffer et al. 2021 ("AdapterFusion") after the MLP only, as OSU-MLB/PETL_Vision (commit 245d262) runs them on
ViTs (``model/adapter.py``, ``model/block.py``; ``experiment/config/method/rand_h_adapter.yml``,
``lora_p_adapter.yml``, ``rand_p_adapter.yml``: ``ft_*_mode: sequential_after``).

Each adapted branch output ``h`` becomes ``h + scale * up(dropout(relu(down(h))))`` before the residual add
(PETL_Vision ``Adapter.forward``, lines 34-54: ReLU, dropout 0.1, the up-projection, times ``adapter_scaler``).
The adapter reads the branch output past its layer scale and drop path - where adapter-bert applies it, after the
sublayer's output dropout (``modeling.py`` lines 942-946 and 960-965), and what PETL_Vision's block feeds it
(``block.py`` lines 109 and 151: ``drop_path(ls(attn(...)))``) - and adds its result there. PETL_Vision then
passes ``h + adapter(h)`` through the layer scale and drop path a second time (lines 110 and 152); that is the same
function in eval mode on a ViT without layer scale (ViT-B/16) and is not copied here: in training it would drop the
branch with two masks. adapter-bert uses GELU inside the adapter; PETL_Vision (and this module) ReLU. The adapter
is not linear, so it does not merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import IncompatibleMethodError
from ..layers.adapters import BOTTLENECK_INITS, Bottleneck, init_bottleneck
from ..schema import setting
from .base import Method, MethodConfig, branch_tensor, register_method, replace_branch_tensor

#: The branches each style adapts.
STYLE_BRANCHES = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}


@dataclass
class AdapterConfig(MethodConfig):
    """Houlsby / Pfeiffer adapter options. ``scale``, ``bottleneck`` and ``dropout`` are PETL_Vision's
    ``adapter_scaler`` (grid 0.01 / 0.1 / 1 / 10), ``adapter_bottleneck`` (grid 4 ... 32, Pfeiffer up to 64) and
    ``Adapter.dropout = 0.1``.

    ``init``: ``houlsby`` (the default) is the official near-identity rule of adapter-bert (``feedforward_adapter``,
    lines 321-360: both weights from a normal of std 1e-3 truncated at two std, biases zero; the paper's "near-identity
    initialization"); ``xavier`` and ``lora_xavier`` are the ``adapter_init`` values of PETL_Vision's grids
    (``rand_h_adapter.yml`` / ``rand_p_adapter.yml`` and ``lora_p_adapter.yml``; ``model/utils.py`` ``init_weight``:
    Xavier weights with N(0, 1e-6) biases, or Xavier down with a zero up-projection, which starts the model
    unchanged). Note that PETL_Vision's published rows ran neither: its ``VisionTransformer.__init__`` calls
    ``init_weights`` after building the blocks (``model/vision_transformer.py`` lines 207-208), which redraws every
    nn.Linear of the adapters from timm's truncated normal of std 0.02 with zero biases.

    Per adapter ``2 D b + b + D`` parameters; ViT-B/16: Houlsby 24 adapters = 165,984 / 313,536 / 608,640 at
    bottleneck 4 / 8 / 16 (PETL_Vision's counts), Pfeiffer 12 adapters = 156,768 at bottleneck 8.

    Attributes:
        style: ``houlsby`` (after the attention and after the MLP) or ``pfeiffer`` (after the MLP only).
        bottleneck: Hidden width of each adapter.
        scale: Multiplier of the adapter output (PETL_Vision's ``adapter_scaler``).
        dropout: Dropout after the adapter's ReLU.
        init: Initialisation rule of the down / up projections: ``houlsby``, ``xavier`` or ``lora_xavier``.
    """

    style: str = setting(
        "houlsby",
        "houlsby: after the attention and the MLP; pfeiffer: after the MLP only",
        choices=("houlsby", "pfeiffer"),
    )
    bottleneck: int = setting(8, "hidden width of each adapter", min=1)
    scale: float = setting(1.0, "multiplier of the adapter output (PETL_Vision's adapter_scaler)", above=0)
    dropout: float = setting(0.1, "dropout after the adapter's ReLU", min=0, below=1)
    init: str = setting(
        "houlsby",
        "initialisation: houlsby (near-identity, std 1e-3), xavier, lora_xavier (zero up-projection)",
        choices=BOTTLENECK_INITS,
    )


@register_method
class BottleneckAdapter(Method):
    name = "adapter"
    config_class = AdapterConfig

    def check_fits(self) -> None:
        super().check_fits()
        where = f"the {self.backbone.family} '{self.tower.name}' tower"
        if not self.blocks():
            raise IncompatibleMethodError(f"adapter needs transformer blocks; {where} has none")
        needed = STYLE_BRANCHES[self.config.style]
        for block in self.blocks():
            if any(name not in block.branches or block.branches[name].output is None for name in needed):
                raise IncompatibleMethodError(
                    f"adapter ({self.config.style}) needs {' and '.join(needed)} branches with an output projection; "
                    f"{block.name} of {where} has {', '.join(block.branches)}"
                )

    def build(self) -> None:
        cfg = self.config
        for block in self.blocks():
            for branch_name in STYLE_BRANCHES[cfg.style]:
                branch = block.branches[branch_name]
                width = branch.output.weight_and_bias()[0].shape[0]
                adapter = Bottleneck(width, cfg.bottleneck, cfg.scale, cfg.dropout)
                init_bottleneck(adapter.down, adapter.up, cfg.init)
                self.add_module(block.module, f"{block.name}.{branch_name}.adapter", adapter)
                # past the branch's layer scale and drop path, before the residual add
                self.hook_output(
                    branch.residual if branch.residual is not None else branch.module, self._adapt, adapter
                )

    @staticmethod
    def _adapt(adapter: Bottleneck, module: nn.Module, args: tuple, output: Any) -> Any:
        h = branch_tensor(output)
        return replace_branch_tensor(output, h + adapter(h))
