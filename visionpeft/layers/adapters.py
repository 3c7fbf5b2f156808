"""Bottleneck adapter modules: AdaptFormer's parallel MLP adapter and Convpass's convolutional bypass."""

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
