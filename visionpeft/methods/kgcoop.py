"""KgCoOp: knowledge-guided context optimisation (Yao, Zhang & Xu, CVPR 2023), on open_clip's CLIP.

CoOp's prompt learner (:class:`~.coop.CoOp`, the same prompts and logits) trained with one more term: the
classification loss plus ``w * (1 - mean_c cos(t_c, t0_c))``, ``t_c`` the normalised text feature of class ``c``'s
learned prompt and ``t0_c`` the normalised feature of the hand-crafted prompt ``template.format(c)`` of the frozen
CLIP (htyao89/KgCoOp ``KgCoOp/trainers/kgcoop.py``: ``PromptLearner.__init__`` lines 136-146 for ``t0``,
``CustomCLIP.forward`` lines 223-243 for the cosine score with ``CosineSimilarity(dim=1, eps=1e-07)``,
``KgCoOp.forward_backward`` lines 309-311 for ``cross_entropy + self.w * score``).

Defaults are the official recipe (``configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml`` + ``scripts/base2new_train.sh``
+ ``scripts/run.sh``): 4 context vectors from ``"a photo of a"`` (with ``CTX_INIT`` set the official code always
starts from these words, line 96), ``w = 8.0``, the template ``"a photo of a {}."`` (the official per-data-set
templates, ``CUSTOM_TEMPLATES`` lines 37-54, go in ``template``). Only ``ctx`` trains (line 270): the official
prompt learner's unused ``meta_net`` and ``bias_vectors`` are not built. The official reference features come from a
second copy of CLIP in fp16 (``clip.build_model`` converts the weights; line 132); here they come from the model's
own text tower in its precision, computed once on first use.

The classification trainer adds the term through the ``regularization_loss`` capability: the method keeps the
class text features of the training forward pass it follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..schema import setting
from .base import register_method
from .clip_fewshot import check_template, hand_crafted_text_features
from .coop import CoOp, CoOpConfig


@dataclass
class KgCoOpConfig(CoOpConfig):
    """KgCoOp options (``TRAINER.COOP``): CoOp's, with the official defaults, plus the guidance.

    Attributes:
        weight: ``w`` of the knowledge-guided term (``TRAINER.COOP.W``).
        template: The hand-crafted prompt whose frozen class features guide the learned ones.
    """

    n_ctx: int = setting(4, "number of context vectors (ignored when ctx_init is given)", min=1)
    ctx_init: str = setting("a photo of a", "words to initialise the context from; empty: random init")
    weight: float = setting(
        8.0, "weight w of the knowledge-guided loss w * (1 - mean cos(learned, hand-crafted))", min=0
    )
    template: str = setting("a photo of a {}.", "the hand-crafted prompt ({} = class name) of the reference features")


@register_method
class KgCoOp(CoOp):
    name = "kgcoop"
    config_class = KgCoOpConfig
    provides = frozenset({"class_text_features", "regularization_loss"})

    def check_fits(self) -> None:
        super().check_fits()
        check_template(self.name, "template", self.config.template)

    def build(self) -> None:
        super().build()
        self.recorded: torch.Tensor | None = None
        self.reference: torch.Tensor | None = None
        self.last_losses: dict[str, float] = {}

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        features = super().text_features()
        if torch.is_grad_enabled():
            self.recorded = features  # the class features of this training forward pass
        return features

    def reference_text_features(self) -> torch.Tensor:
        """``t0``: the frozen tower's normalised features of the hand-crafted prompts (n_cls, d), computed once."""
        device = self.context.tokens.device
        if self.reference is None or self.reference.device != device:
            self.reference = hand_crafted_text_features(self.backbone, self.config.classnames, (self.config.template,))
        return self.reference

    def knowledge_score(self, text_features: torch.Tensor) -> torch.Tensor:
        """``1 - mean_c cos(t_c, t0_c)`` for the normalised learned class features ``text_features``."""
        reference = self.reference_text_features()
        return 1.0 - F.cosine_similarity(text_features.float(), reference, dim=1, eps=1e-7).mean()

    def regularization_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """``w * (1 - mean cos)`` for the class text features of the training forward pass that gave ``outputs``."""
        if self.recorded is None:
            raise RuntimeError(f"{self.name}'s regularization_loss follows a forward pass of the model with gradients")
        text, self.recorded = self.recorded, None
        loss = self.config.weight * self.knowledge_score(text)
        self.last_losses = {"kg_loss": float(loss.detach())}
        return loss

    def diagnostics(self) -> dict[str, float]:
        """The weighted knowledge-guided term of the latest ``regularization_loss``."""
        return dict(self.last_losses)
