"""IVLP: independent vision-language prompting (Khattak et al., CVPR 2023, the MaPLe paper's baseline), on open_clip.

Deep prompts in both towers with no coupling between them (muzairkhattak/multimodal-prompt-learning
``trainers/independentVL.py`` and ``clip/model.py``): the shallow text context ``ctx`` of the class prompt
(``VLPromptLearner``, lines 82-100; see :mod:`.deep_prompts`), text prompts of their own in text blocks
``1 .. J_t - 1`` and vision prompts joining the embedded image (``VisionTransformer.VPT``, ``clip/model.py`` lines
373-378, 404-406) and in vision blocks ``1 .. J_v - 1`` (``ResidualAttentionBlock_IVLP.VPT_shallow``, lines 210-252),
every one N(0, 0.02). Defaults are PromptSRC's IVLP configuration (muzairkhattak/PromptSRC
``configs/trainers/IVLP/vit_b16_c2_ep20_batch4_4+4ctx.yaml``: 4 + 4 tokens, depth 9 in both towers), the
baseline PromptSRC builds on: on ViT-B/16 ``9*4*512 + 9*4*768`` = 46,080 trained parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schema import setting
from .base import register_method
from .deep_prompts import ClassPrompts, DeepPromptConfig, DeepPromptLearner, prompt_parameters


@dataclass
class IVLPConfig(DeepPromptConfig):
    """IVLP options (``TRAINER.IVLP``); defaults are PromptSRC's IVLP configuration (4 + 4 tokens, depth 9).

    Attributes:
        n_ctx_text: Text prompt tokens per layer.
        n_ctx_vision: Vision prompt tokens per layer.
        prompt_depth_text: Text layers with prompts, counting the input (at least 1: the class prompt's context).
        prompt_depth_vision: Vision layers with prompts, counting the input (0: no vision prompts).
    """

    n_ctx_text: int = setting(4, "text prompt tokens per layer", min=1)
    n_ctx_vision: int = setting(4, "vision prompt tokens per layer", min=1)
    prompt_depth_text: int = setting(9, "text layers with prompts, counting the input", min=1)
    prompt_depth_vision: int = setting(9, "vision layers with prompts, counting the input (0: none)", min=0)


class IndependentPrompts(ClassPrompts):
    """The learned tensors of IVLP: ``ctx`` (the class prompt's context), ``text[i]`` (text block ``i + 1``) and
    ``vision[i]`` (vision block ``i``; ``vision[0]`` joins the embedded image)."""

    def __init__(self, backbone, config: IVLPConfig, vision_width: int) -> None:
        super().__init__(backbone, config.classnames, config.n_ctx_text, config.ctx_init)
        self.text = prompt_parameters(config.prompt_depth_text - 1, config.n_ctx_text, backbone.text_width)
        self.vision = prompt_parameters(config.prompt_depth_vision, config.n_ctx_vision, vision_width)


@register_method
class IVLP(DeepPromptLearner):
    name = "ivlp"
    config_class = IVLPConfig

    def prompt_lengths(self) -> tuple[int, int]:
        return self.config.n_ctx_text, self.config.n_ctx_vision

    def prompt_depths(self) -> tuple[int, int]:
        return self.config.prompt_depth_text, self.config.prompt_depth_vision

    def depth_options(self) -> tuple[str, str]:
        return "prompt_depth_text", "prompt_depth_vision"

    def build(self) -> None:
        prompts = IndependentPrompts(self.backbone, self.config, self.vision_tower().tokens.dim)
        self.context = self.add_module(self.backbone.model, self.name, prompts)
        self.install()

    def text_prompt(self, block: int) -> torch.Tensor:
        return self.context.text[block - 1]

    def vision_prompt(self, block: int) -> torch.Tensor:
        return self.context.vision[block]
