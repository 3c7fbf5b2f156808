"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023), on open_clip's CLIP.

Language prompts in the first ``J`` text layers; the vision prompts of the same layers are functions of them
(muzairkhattak/multimodal-prompt-learning ``trainers/maple.py``, ``MultiModalPromptLearner``): the shallow context
``ctx`` (the first ``n_ctx`` word tokens of the class prompt, see :mod:`.deep_prompts`) goes through
``proj = Linear(text width, vision width)`` to give the vision tokens that join the image (lines 103-105, 176), and
each deeper text prompt ``compound_prompts_text[i]`` (N(0, 0.02), lines 111-114) through its own coupling
``compound_prompt_projections[i]`` (lines 116-117, 171-173) to give the vision prompt of the same layer.

Initialisation as the official code: ``proj`` and the deep couplings are ``nn.Linear`` layers with PyTorch's default
init, and the ``J - 1`` deep couplings start as copies of one layer (``_get_clones``: ``copy.deepcopy`` of one
``nn.Linear``, line 117 / 207-208), not as independent draws. Defaults ``N_CTX=2``, ``CTX_INIT="a photo of a"``,
``PROMPT_DEPTH=9`` (``train.py`` lines 106-109 and ``configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml``): on
ViT-B/16 (text width 512, vision width 768) ``2*512 + (512*768 + 768) + 8*2*512 + 8*(512*768 + 768)`` = 3,555,072
trained parameters. The official code keeps ``proj`` in fp16 (``self.proj.half()``, line 104: its default precision
is fp16); here every prompt parameter is stored in the model's dtype and runs in the run's precision.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..schema import setting
from .base import register_method
from .deep_prompts import ClassPrompts, DeepPromptConfig, DeepPromptLearner, prompt_parameters


@dataclass
class MaPLeConfig(DeepPromptConfig):
    """MaPLe options; defaults are the official code's (``TRAINER.MAPLE``: ``N_CTX=2``, ``PROMPT_DEPTH=9``,
    ``CTX_INIT="a photo of a"``).

    Attributes:
        n_ctx: Prompt tokens per layer (text and vision alike).
        prompt_depth: Layers of each tower that get prompts, counting the input (1: shallow MaPLe).
    """

    n_ctx: int = setting(2, "prompt tokens per layer, in both towers", min=1)
    prompt_depth: int = setting(9, "layers of each tower that get prompts, counting the input (1: shallow)", min=1)


class MultiModalPrompts(ClassPrompts):
    """The learned tensors of MaPLe, under the official names."""

    def __init__(self, backbone, config: MaPLeConfig, vision_width: int) -> None:
        super().__init__(backbone, config.classnames, config.n_ctx, config.ctx_init)
        text_width, deep = backbone.text_width, config.prompt_depth - 1
        self.proj = nn.Linear(text_width, vision_width)
        self.compound_prompts_text = prompt_parameters(deep, config.n_ctx, text_width)
        coupling = nn.Linear(text_width, vision_width)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(coupling) for _ in range(deep)])


@register_method
class MaPLe(DeepPromptLearner):
    name = "maple"
    config_class = MaPLeConfig

    def prompt_lengths(self) -> tuple[int, int]:
        return self.config.n_ctx, self.config.n_ctx

    def prompt_depths(self) -> tuple[int, int]:
        return self.config.prompt_depth, self.config.prompt_depth

    def depth_options(self) -> tuple[str, str]:
        return "prompt_depth", "prompt_depth"

    def build(self) -> None:
        prompts = MultiModalPrompts(self.backbone, self.config, self.vision_tower().tokens.dim)
        self.context = self.add_module(self.backbone.model, self.name, prompts)
        self.install()

    def text_prompt(self, block: int) -> torch.Tensor:
        return self.context.compound_prompts_text[block - 1]

    def vision_prompt(self, block: int) -> torch.Tensor:
        c = self.context
        if block == 0:
            return c.proj(c.ctx)
        return c.compound_prompt_projections[block - 1](c.compound_prompts_text[block - 1])
