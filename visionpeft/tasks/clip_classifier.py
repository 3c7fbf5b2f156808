"""An image classifier made of an open_clip model and class names.

Three ways to turn CLIP into a classifier, one module:

* zero-shot: logits are ``logit_scale * cos(image, text)`` against hand-written prompts (one template or an
  ensemble, features averaged as in CLIP's ImageNet evaluation);
* learned prompts: with a method attached that provides ``class_text_features`` (CoOp) or ``image_logits``
  (CoCoOp), the class text (or the logits) come from it;
* a linear head (``head=True``) initialised from the class-name text embeddings (times the logit scale, bias 0),
  so it starts as exactly the zero-shot classifier; methods on the vision tower (LoRA, VPT, AdaptFormer) train
  with it.

Class text features are computed once and cached whenever they cannot change (eval mode or no gradient), so
learned-prompt inference costs what zero-shot CLIP costs. The classifier is a task model: ``attach`` adapts its
CLIP (parameter names start with ``clip.``) and trains its head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import methods_of
from ..backbones.open_clip import clip_tokenize
from ..errors import ConfigError
from ..methods import METHODS

SINGLE_TEMPLATE = ("a photo of a {}.",)
#: Capabilities of methods that replace the hand-written class prompts.
PROMPT_CAPABILITIES = ("class_text_features", "image_logits")


class CLIPClassifier(nn.Module):
    """CLIP as a classifier over ``classnames``.

    Args:
        clip: An open_clip ``CLIP`` / ``CustomTextCLIP``.
        classnames: Class names in label order.
        templates: Prompt templates with one ``{}`` (the 80 ImageNet templates for an ensemble).
        head: Add a trainable linear head initialised from the zero-shot text embeddings.
    """

    def __init__(
        self,
        clip: nn.Module,
        classnames: Sequence[str],
        templates: Sequence[str] = SINGLE_TEMPLATE,
        head: bool = False,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.templates = list(templates)
        self._cache: torch.Tensor | None = None
        self.head: nn.Linear | None = None
        if head:
            with torch.no_grad():
                text = self.zero_shot_text_features()
                scale = clip.logit_scale.exp()
            self.head = nn.Linear(text.shape[1], text.shape[0]).to(text.device)
            with torch.no_grad():
                self.head.weight.copy_(text * scale)
                self.head.bias.zero_()

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def inner_model(self) -> nn.Module:
        """The task-model protocol: the library model methods adapt."""
        return self.clip

    def task_heads(self) -> dict[str, nn.Module | None]:
        """The task-model protocol: the linear head, if there is one."""
        return {"head": self.head}

    def train(self, mode: bool = True) -> CLIPClassifier:
        self._cache = None
        return super().train(mode)

    def zero_shot_text_features(self) -> torch.Tensor:
        """Normalised class embeddings from the hand-written templates (template ensemble averaged)."""
        length = self.clip.context_length
        device = self.clip.logit_scale.device
        features = []
        for name in self.classnames:
            tokens = clip_tokenize([t.format(name) for t in self.templates], length, self.clip).to(device)
            emb = F.normalize(self.clip.encode_text(tokens), dim=-1).mean(dim=0)
            features.append(F.normalize(emb, dim=-1))
        return torch.stack(features)

    def _provider(self, capability: str) -> Any:
        return next((m for m in methods_of(self) if capability in m.provides), None)

    def class_text_features(self) -> torch.Tensor:
        """The current class text features (from a method providing them, else zero-shot), cached if fixed."""
        if self._cache is not None:
            return self._cache
        learner = self._provider("class_text_features")
        features = learner.class_text_features() if learner is not None else self.zero_shot_text_features()
        if not features.requires_grad:  # nothing trainable on the text side (frozen tower, no learned prompt)
            self._cache = features.detach()
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.clip.encode_image(images), dim=-1)
        if self.head is not None:
            return self.head(image)
        conditional = self._provider("image_logits")
        if conditional is not None:
            return conditional.image_logits(image)
        return self.clip.logit_scale.exp() * image @ self.class_text_features().to(image.dtype).t()


def prompt_learning_methods() -> list[str]:
    """The registered methods that learn class prompts (CoOp / CoCoOp): those providing a prompt capability."""
    return [n for n in METHODS.names() if any(c in METHODS.get(n).provides for c in PROMPT_CAPABILITIES)]


def prompt_learner(model: Any) -> Any:
    """The attached method that learns class prompts (CoOp / CoCoOp) of ``model`` (a CLIP or a classifier)."""
    for method in methods_of(model):
        if any(c in method.provides for c in PROMPT_CAPABILITIES):
            return method
    raise ConfigError(f"no prompt-learning method ({', '.join(prompt_learning_methods())}) is attached to this model")
