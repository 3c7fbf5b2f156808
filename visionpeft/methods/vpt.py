"""Visual Prompt Tuning (Jia et al., ECCV 2022): learnable tokens inserted after the prefix tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..schema import setting
from .base import Method, MethodConfig, register_method


@dataclass
class VPTConfig(MethodConfig):
    """VPT options; defaults are the official code's (KMnP/vpt ``configs/config.py``: ``PROMPT.NUM_TOKENS=5``,
    ``DEEP=False``, ``DROPOUT=0.0``). ViT-B/16 with 10 deep tokens trains 12 x 10 x 768 = 92,160 parameters.

    Attributes:
        num_tokens: Prompt tokens per prompted layer.
        deep: Prompt every block (a fresh set replaces the previous block's prompt outputs) instead of only the
            input of the first block.
        dropout: Dropout on the prompt embeddings.
    """

    num_tokens: int = setting(5, "prompt tokens per prompted layer", min=1)
    deep: bool = setting(False, "prompt every block instead of the first block's input only")
    dropout: float = setting(0.0, "dropout on the prompt embeddings", min=0, below=1)


class PromptTokens(nn.Module):
    """One set of prompt tokens, xavier-uniform initialised as the official code does."""

    def __init__(self, num_tokens: int, dim: int, bound: float, dropout: float) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.empty(num_tokens, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)

    def expand(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.prompt.to(like.dtype)).unsqueeze(0).expand(batch, -1, -1)


@register_method
class VPT(Method):
    name = "vpt"
    config_class = VPTConfig
    frozen_eval = True  # the official trainer keeps the frozen encoder in eval mode (ViT.train() override)
    requires = {"tokens": "a ViT-style token sequence with a patch grid"}

    def build(self) -> None:
        cfg, layout = self.config, self.tower.tokens
        # val = sqrt(6 / (3 * patch * patch + prompt_dim)), the official xavier_uniform bound
        bound = math.sqrt(6.0 / (layout.in_chans * layout.patch_size**2 + layout.dim))
        self.offset = layout.total_prefix
        blocks = self.blocks() if cfg.deep else self.blocks()[:1]
        for i, block in enumerate(blocks):
            prompts = PromptTokens(cfg.num_tokens, layout.dim, bound, cfg.dropout)
            self.add_module(block.module, f"{block.name}.vpt", prompts)
            self.hook_tokens_input(block.module, self._insert if i == 0 else self._replace, prompts)
        self.hook_tokens_output(self.blocks()[-1].module, self._strip)
        layout.extra_prefix += cfg.num_tokens

    def detach(self) -> None:
        if self.tensors:
            self.tower.tokens.extra_prefix -= self.config.num_tokens
        super().detach()

    def forget(self) -> None:  # pragma: no cover - VPT cannot merge, so it is never forgotten
        raise RuntimeError("VPT cannot be merged")

    def _insert(self, prompts: PromptTokens, x: torch.Tensor) -> torch.Tensor:
        p = prompts.expand(x.shape[0], x)
        return torch.cat([x[:, : self.offset], p, x[:, self.offset :]], dim=1)

    def _replace(self, prompts: PromptTokens, x: torch.Tensor) -> torch.Tensor:
        p = prompts.expand(x.shape[0], x)
        return torch.cat([x[:, : self.offset], p, x[:, self.offset + self.config.num_tokens :]], dim=1)

    def _strip(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return torch.cat([output[:, : self.offset], output[:, self.offset + self.config.num_tokens :]], dim=1)
