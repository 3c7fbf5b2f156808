"""Deep prompts in both CLIP towers: what MaPLe, IVLP and PromptSRC (Khattak et al., CVPR 2023 / ICCV 2023) share.

The official code (muzairkhattak/multimodal-prompt-learning ``trainers/maple.py``, ``trainers/independentVL.py``,
``clip/model.py``; the same files in muzairkhattak/PromptSRC) prompts both towers of a frozen CLIP:

* text: the class prompt is ``"{ctx_init} {class}."`` with its first ``n`` word tokens after ``[SOS]`` replaced by
  learned context vectors (initialised from those words' embeddings when ``ctx_init`` is given and ``n <= 4``, else
  N(0, 0.02) behind ``"X X ... X {class}."``). The rest of the init words stay in the prompt, so with the default
  ``"a photo of a"`` and ``n = 2`` the prompt starts as the hand-written ``"a photo of a {class}."``. Text blocks
  ``1 .. J-1`` replace the outputs at positions ``1 .. n`` of the block before with prompts of their own (every text
  the tower encodes gets them, as the official blocks do).
* vision: ``m`` prompt tokens join the embedded image (position embedding added, before ``ln_pre``); vision blocks
  ``1 .. J-1`` replace them with prompts of their own, and the class token is read out as before.

Where the official vision tower appends its prompts after the patch tokens, they sit here right after the class
token (where VPT puts its prompts, so ``vp.features`` and token methods find the patches where they expect them):
the vision tower has no attention mask and adds no position embedding after this point, so every output is the same
(tests compare against the official layout). They are removed after the last block (the class-token read-out never
saw them). :meth:`DeepPromptLearner.prompts_off` runs the frozen CLIP without any prompt (PromptSRC's teacher).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Tower
from ..errors import ConfigError, IncompatibleMethodError
from ..schema import setting
from .base import Method, MethodConfig

#: The official learners use ``ctx_init`` only for at most this many context vectors (``if ctx_init and n_ctx <= 4``).
MAX_WORD_INIT = 4
#: Standard deviation of every randomly initialised prompt (``nn.init.normal_(..., std=0.02)`` throughout).
PROMPT_STD = 0.02


@dataclass
class DeepPromptConfig(MethodConfig):
    """Options every deep vision-language prompt learner has (the task fills in ``classnames``)."""

    tower: str | None = setting("text", "the tower whose class prompts are learned (the vision tower is prompted too)")
    classnames: tuple[str, ...] = setting((), "the class names, in label order (the task fills them in)")
    ctx_init: str = setting(
        "a photo of a", "words whose embeddings initialise the text context (at most 4 vectors); empty: N(0, 0.02)"
    )


class ClassPrompts(nn.Module):
    """The text side of the official prompt learners: ``n_ctx`` learned context vectors (``ctx``) and the frozen
    pieces of every class prompt, as CoOp keeps them (non-persistent buffers: ``tokens``, ``token_prefix`` =
    ``[SOS]``, ``token_suffix`` = the rest). Subclasses add the deeper prompts after ``ctx`` (the official draw order).
    """

    def __init__(self, backbone, classnames: tuple[str, ...], n_ctx: int, ctx_init: str) -> None:
        super().__init__()
        names = [n.replace("_", " ") for n in classnames]
        words = ctx_init.replace("_", " ").strip()
        with torch.no_grad():
            if words and n_ctx <= MAX_WORD_INIT:
                ctx = backbone.token_embedding(backbone.tokenize([words]))[0, 1 : 1 + n_ctx].float().clone()
                prefix = words
            else:
                ctx = torch.empty(n_ctx, backbone.text_width).normal_(0, PROMPT_STD)
                prefix = " ".join(["X"] * n_ctx)
            tokens = backbone.tokenize([f"{prefix} {name}." for name in names])
            embedding = backbone.token_embedding(tokens).detach()
        self.ctx = nn.Parameter(ctx)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :].clone(), persistent=False)

    def prompts(self) -> torch.Tensor:
        """Token embeddings of every class prompt: ``[SOS]``, the context vectors, the rest (n_cls, context, width)."""
        ctx = self.ctx.to(self.token_prefix.dtype).unsqueeze(0).expand(self.token_prefix.shape[0], -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)


def prompt_parameters(count: int, length: int, width: int) -> nn.ParameterList:
    """``count`` prompts of ``length`` tokens, each N(0, 0.02) as the official layers draw them."""
    return nn.ParameterList([nn.Parameter(torch.empty(length, width).normal_(0, PROMPT_STD)) for _ in range(count)])


def replace_tokens(x: torch.Tensor, start: int, prompt: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """``x`` with the tokens at ``start .. start + len(prompt)`` replaced by ``prompt`` (the same for every sequence);
    ``x`` is (batch, tokens, width), or (tokens, batch, width) when not ``batch_first``."""
    if not batch_first:
        x = x.transpose(0, 1)
    p = prompt.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    out = torch.cat([x[:, :start], p, x[:, start + prompt.shape[0] :]], dim=1)
    return out if batch_first else out.transpose(0, 1)


class DeepPromptLearner(Method):
    """Base of the prompt learners acting on both CLIP towers. A subclass adds its prompt module (a
    :class:`ClassPrompts`) as ``self.context``, calls :meth:`install`, and says which prompt each layer gets through
    :meth:`text_prompt` and :meth:`vision_prompt`."""

    requires = {"text_prompts": "an open_clip model's text tower (it learns CLIP text prompts)"}
    provides = frozenset({"class_text_features"})
    task_inputs = ("classnames",)

    def __init__(self, config: DeepPromptConfig, backbone) -> None:
        super().__init__(config, backbone)
        self.active = True

    # -- what subclasses say -------------------------------------------------------------------------------------
    def prompt_lengths(self) -> tuple[int, int]:
        """``(text tokens, vision tokens)`` per prompted layer."""
        raise NotImplementedError

    def prompt_depths(self) -> tuple[int, int]:
        """``(text depth, vision depth)``: the number of blocks whose input is prompted, counting the first."""
        raise NotImplementedError

    def text_prompt(self, block: int) -> torch.Tensor:
        """The prompt replacing text tokens ``1 .. n`` at the input of text block ``block`` (1 .. depth - 1)."""
        raise NotImplementedError

    def vision_prompt(self, block: int) -> torch.Tensor:
        """The vision prompt at the input of vision block ``block`` (0: joining the embedded image)."""
        raise NotImplementedError

    # -- checks and hooks ----------------------------------------------------------------------------------------
    def vision_tower(self) -> Tower:
        return self.backbone.tower("vision")

    def check_fits(self) -> None:
        super().check_fits()
        if not self.config.classnames:
            raise ConfigError(f"{self.name} needs classnames (the class names in label order)")
        vision = self.vision_tower()
        if vision.tokens is None or "pre_norm" not in vision.stages:
            raise IncompatibleMethodError(
                f"{self.name} prompts a ViT-style vision tower; the {self.backbone.family} vision tower is not one"
            )
        if vision.tokens.extra_prefix:
            raise IncompatibleMethodError(
                f"{self.name} adds its vision prompts before the first block: attach it before the other prompt-token "
                f"methods ({vision.tokens.extra_prefix} prompt tokens are in place)"
            )
        for tower, depth, option in zip((self.tower, vision), self.prompt_depths(), self.depth_options()):
            if depth > len(tower.blocks):
                raise ConfigError(
                    f"{self.name} {option}={depth} exceeds the {len(tower.blocks)} blocks of the {tower.name} tower"
                )
        words = self.config.ctx_init.replace("_", " ").strip()
        n_text = self.prompt_lengths()[0]
        if words and n_text <= MAX_WORD_INIT:
            available = len(self.backbone.tokenize([words])[0].nonzero()) - 2
            if n_text > available:
                raise ConfigError(
                    f"{self.name} ctx_init '{words}' has {available} tokens, fewer than the {n_text} context vectors "
                    "it initialises"
                )

    def depth_options(self) -> tuple[str, str]:
        """The option names of the text and vision depths (for messages)."""
        raise NotImplementedError

    def install(self) -> None:
        """Hooks the prompts into both towers (after the subclass added its modules)."""
        vision = self.vision_tower()
        text_depth, vision_depth = self.prompt_depths()
        self.offset = vision.tokens.total_prefix
        text_first = self.backbone.text_batch_first
        for i in range(1, text_depth):
            self.hook_input(self.tower.blocks[i].module, self._prompt_text, i, text_first)
        if vision_depth:
            self.hook_input(vision.stages["pre_norm"], self._insert_vision)
            for i in range(1, vision_depth):
                self.hook_input(vision.blocks[i].module, self._replace_vision, i, vision.tokens.batch_first)
            self.hook_output(vision.blocks[-1].module, self._strip_vision, vision.tokens.batch_first)
            vision.tokens.extra_prefix += self.prompt_lengths()[1]

    def detach(self) -> None:
        if self.tensors and self.prompt_depths()[1]:
            self.vision_tower().tokens.extra_prefix -= self.prompt_lengths()[1]
        super().detach()

    def _prompt_text(self, block: int, batch_first: bool, module: nn.Module, inputs: tuple) -> tuple | None:
        if not self.active:
            return None
        return (replace_tokens(inputs[0], 1, self.text_prompt(block), batch_first), *inputs[1:])

    def _insert_vision(self, module: nn.Module, inputs: tuple) -> tuple | None:
        if not self.active:
            return None
        x = inputs[0]  # (batch, tokens, width) before the blocks, whatever their layout
        p = self.vision_prompt(0).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return (torch.cat([x[:, : self.offset], p, x[:, self.offset :]], dim=1), *inputs[1:])

    def _replace_vision(self, block: int, batch_first: bool, module: nn.Module, inputs: tuple) -> tuple | None:
        if not self.active:
            return None
        return (replace_tokens(inputs[0], self.offset, self.vision_prompt(block), batch_first), *inputs[1:])

    def _strip_vision(self, batch_first: bool, module: nn.Module, inputs: tuple, output: torch.Tensor):
        if not self.active:
            return None
        x = output if batch_first else output.transpose(0, 1)
        x = torch.cat([x[:, : self.offset], x[:, self.offset + self.prompt_lengths()[1] :]], dim=1)
        return x if batch_first else x.transpose(0, 1)

    @contextlib.contextmanager
    def prompts_off(self) -> Iterator[None]:
        """Within the block both towers run as the frozen CLIP, without any prompt of this method."""
        self.active = False
        try:
            yield
        finally:
            self.active = True

    # -- features and logits -------------------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """L2-normalised features of every class prompt (n_cls, d), deep text prompts included."""
        return F.normalize(self.backbone.encode_text_embeddings(self.context.prompts(), self.context.tokens), dim=-1)

    def class_text_features(self) -> torch.Tensor:
        """The ``class_text_features`` capability (what a ``CLIPClassifier`` asks for)."""
        return self.text_features()

    def logits(self, images: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """``logit_scale * cos(prompted image, class prompt)`` for a batch of images."""
        image = F.normalize(self.backbone.encode_image(images), dim=-1)
        text = self.text_features() if text_features is None else text_features
        return self.backbone.logit_scale.exp() * image @ text.to(image.dtype).t()
