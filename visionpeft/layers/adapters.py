"""Adapter modules: AdaptFormer's parallel MLP adapter (also the Houlsby / Pfeiffer bottleneck, with
:func:`init_bottleneck`), Convpass's convolutional bypass and RepAdapter's re-parameterisable layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the activation CLIP and the official Convpass code use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Bottleneck(nn.Module):
    """AdaptFormer's AdaptMLP: ``scale * up(dropout(relu(down(x))))``.

    Initialised as the official code's ``init_option="lora"``: down kaiming-uniform (a=sqrt(5)), up and both biases
    zero, so the output is exactly zero at initialisation.

    Args:
        dim: Token width. bottleneck: Hidden width. scale: Output multiplier. dropout: Dropout after the ReLU.
    """

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(F.relu(self.down(x)))) * self.scale


class ConvBypass(nn.Module):
    """Convpass (Jie & Deng 2022): down-projection, 3x3 conv over the patch grid, up-projection.

    Prefix tokens (class token, registers, prompts) are convolved as 1x1 images, as the official code does for the
    class token: with padding 1 only the kernel centre touches them. The conv starts as the identity (zero kernel,
    identity centre), the up-projection at zero, so the bypass outputs zero at initialisation.

    Args:
        dim: Token width. hidden: Bypass width (the paper's d=8). dropout: Dropout before the up-projection.
    """

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.up = nn.Linear(hidden, dim)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.conv.weight)
            self.conv.weight[:, :, 1, 1] += torch.eye(hidden)
            nn.init.zeros_(self.conv.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.act(self.down(x))
        prefix = F.linear(h[:, :num_prefix], self.conv.weight[:, :, 1, 1], self.conv.bias)
        patches = h[:, num_prefix:].transpose(1, 2).reshape(b, -1, *grid)
        patches = self.conv(patches).flatten(2).transpose(1, 2)
        h = self.dropout(self.act(torch.cat([prefix, patches], dim=1)))
        return self.up(h)


#: Initialisation rules of a bottleneck adapter's down / up projections (:func:`init_bottleneck`).
BOTTLENECK_INITS = ("houlsby", "xavier", "lora_xavier")


def init_bottleneck(down: nn.Linear, up: nn.Linear, rule: str) -> None:
    """Initialises a bottleneck adapter's projections by ``rule``.

    - ``houlsby``: both weights from a normal of std 1e-3 truncated at two std, biases zero: a near-identity
      adapter (google-research/adapter-bert ``modeling.py``, ``feedforward_adapter(init_scale=1e-3)``, lines
      321-360, with TensorFlow's ``truncated_normal_initializer``).
    - ``xavier``: both weights Xavier-uniform, biases ~ N(0, 1e-6) (OSU-MLB/PETL_Vision ``model/utils.py``
      ``init_weight``, lines 18-22).
    - ``lora_xavier``: down Xavier-uniform, up and both biases zero, so the adapter outputs exactly zero
      (``init_weight``, lines 13-17).
    """
    with torch.no_grad():
        if rule == "houlsby":
            for layer in (down, up):
                nn.init.trunc_normal_(layer.weight, std=1e-3, a=-2e-3, b=2e-3)
                nn.init.zeros_(layer.bias)
        elif rule == "xavier":
            for layer in (down, up):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.normal_(layer.bias, std=1e-6)
        elif rule == "lora_xavier":
            nn.init.xavier_uniform_(down.weight)
            for tensor in (down.bias, up.weight, up.bias):
                nn.init.zeros_(tensor)
        else:
            raise ValueError(f"unknown bottleneck initialisation '{rule}'; choose one of {', '.join(BOTTLENECK_INITS)}")


class RepAdapterLayer(nn.Module):
    """RepAdapter (Luo et al. 2023): ``x + scale * conv_B(dropout(conv_A(x)))`` on each token.

    ``conv_A`` is a 1x1 Conv1d from the token width to ``bottleneck`` channels, ``conv_B`` a grouped 1x1 Conv1d back
    (``groups`` groups), both with biases: the official module's parameters, names and shapes
    (luogen1996/RepAdapter ``repadapter.py``, ``RepAdapter``, lines 147-172). Initialised as there: ``conv_A``
    Xavier-uniform, ``conv_B`` and both biases zero, so the layer starts as the identity. Tokens stay
    ``(..., width)``: the 1x1 convolutions run as linear maps, ``conv_B`` as its block-diagonal dense matrix.

    Without dropout (eval mode) the layer is affine, ``x -> T x + c`` (:meth:`affine`), which is what lets it be
    folded into the Linear layers that read its output.

    Args:
        dim: Token width. bottleneck: Hidden width. groups: Groups of ``conv_B`` (divides both widths).
        scale: Output multiplier. dropout: Dropout between ``conv_A`` and ``conv_B``.
    """

    def __init__(self, dim: int, bottleneck: int, groups: int, scale: float, dropout: float) -> None:
        super().__init__()
        if bottleneck % groups or dim % groups:
            raise ValueError(f"groups {groups} must divide both the bottleneck {bottleneck} and the width {dim}")
        self.conv_A = nn.Conv1d(dim, bottleneck, 1)
        self.conv_B = nn.Conv1d(bottleneck, dim, 1, groups=groups)
        self.dropout = nn.Dropout(dropout)
        self.groups, self.scale = groups, scale
        with torch.no_grad():
            nn.init.xavier_uniform_(self.conv_A.weight)
            for tensor in (self.conv_A.bias, self.conv_B.weight, self.conv_B.bias):
                nn.init.zeros_(tensor)

    def up_matrix(self) -> torch.Tensor:
        """``conv_B`` as a dense ``(dim, bottleneck)`` matrix: group ``i``'s output rows read only its inputs."""
        return torch.block_diag(*self.conv_B.weight[..., 0].chunk(self.groups, dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(F.linear(x, self.conv_A.weight[..., 0], self.conv_A.bias))
        return x + F.linear(hidden, self.up_matrix(), self.conv_B.bias) * self.scale

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, c)`` with ``layer(x) = T x + c`` without dropout: ``T = I + scale B A``, ``c = scale (B a + b)``
        (``A``, ``a``: conv_A's weight and bias; ``B``, ``b``: conv_B's, dense)."""
        down, up = self.conv_A.weight[..., 0], self.up_matrix()
        eye = torch.eye(down.shape[1], dtype=down.dtype, device=down.device)
        return eye + self.scale * (up @ down), self.scale * (up @ self.conv_A.bias + self.conv_B.bias)
