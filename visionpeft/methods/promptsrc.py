"""PromptSRC: prompting with self-regulating constraints (Khattak et al., ICCV 2023), on open_clip's CLIP.

IVLP's deep prompts in both towers (:mod:`.ivlp`) trained with three self-regulating terms against the frozen CLIP
(muzairkhattak/PromptSRC ``trainers/promptsrc.py``):

* ``L_SCL_text``: L1 (mean) between the normalised prompted class text features and the frozen ones, times
  ``text_loss_weight`` (25; lines 299-301). The frozen class features are the mean of the frozen text tower's
  unnormalised features over the hand-crafted templates, normalised (lines 113-128, 199-200): PromptSRC's
  ``IMAGENET_TEMPLATES`` (``trainers/imagenet_templates.py`` lines 3-64), which are the first 60 of CLIP's 80
  ImageNet templates with ``"a photo of a {}."`` moved first.
* ``L_SCL_image``: L1 (mean) between the normalised prompted image features and the frozen tower's, times
  ``image_loss_weight`` (10; lines 201-203, 302-304).
* ``L_SCL_logits``: KL(frozen zero-shot || prompted) over the classes of each image, summed and divided by the
  number of logits (lines 305-311), the zero-shot logits being ``logit_scale * frozen image @ frozen text``
  (line 205); weight 1 there (``logits_loss_weight``).

The classification trainer adds them to the cross-entropy through the ``regularization_loss`` capability (the
method records the prompted features of the training forward pass it follows). Gaussian-weighted prompt aggregation
(GPA, lines 262-270, 320-335): after every epoch the trained tensors are added with the weight ``N(e; gpa_mean,
gpa_std)`` of epoch ``e = 1 .. E`` (weights normalised over the run's ``E`` epochs); the run ends with that sum in the
model. The method gives the weights (``epoch_weights`` capability); the training loop keeps the sum. Defaults are the
base-to-new configuration (``configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml``: GPA mean 15, std 1);
the few-shot one uses mean 30, std 30 (``vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml``). The official code
averages its whole state dict, frozen weights included (unchanged up to rounding, since the weights sum to 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..schema import setting
from .base import register_method
from .ivlp import IVLP, IVLPConfig

#: PromptSRC's 60 templates: CLIP's ImageNet templates 0-59 with "a photo of a {}." (number 39) first.
TEMPLATE_ORDER = (39, *range(39), *range(40, 60))


def promptsrc_templates() -> list[str]:
    """PromptSRC's ``IMAGENET_TEMPLATES`` (from open_clip's copy of CLIP's 80 ImageNet templates)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [OPENAI_IMAGENET_TEMPLATES[i]("{}") for i in TEMPLATE_ORDER]


@dataclass
class PromptSRCConfig(IVLPConfig):
    """PromptSRC options (``TRAINER.PROMPTSRC``); the prompts are IVLP's (4 + 4 tokens, depth 9).

    Attributes:
        text_loss_weight: Weight of the L1 term on the class text features.
        image_loss_weight: Weight of the L1 term on the image features.
        logits_loss_weight: Weight of the KL term on the logits.
        gpa_mean: Mean (in epochs, counted from 1) of GPA's Gaussian over epochs.
        gpa_std: Its standard deviation.
    """

    text_loss_weight: float = setting(25.0, "weight of the L1 loss to the frozen class text features", min=0)
    image_loss_weight: float = setting(10.0, "weight of the L1 loss to the frozen image features", min=0)
    logits_loss_weight: float = setting(1.0, "weight of the KL loss to the frozen zero-shot logits", min=0)
    gpa_mean: float = setting(15.0, "mean epoch (from 1) of the Gaussian prompt aggregation")
    gpa_std: float = setting(1.0, "standard deviation (epochs) of the Gaussian prompt aggregation", above=0)


def gaussian_epoch_weights(epochs: int, mean: float, std: float) -> list[float]:
    """The official GPA weights: the N(mean, std) density at epochs 1 .. ``epochs``, normalised to sum 1."""
    density = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    total = sum(density)
    if not total > 0:
        raise ConfigError(
            f"promptsrc's prompt aggregation gives every one of the {epochs} epochs weight 0 (gpa_mean={mean}, "
            f"gpa_std={std}); set gpa_mean within the run's epochs or a larger gpa_std"
        )
    return [d / total for d in density]


@register_method
class PromptSRC(IVLP):
    name = "promptsrc"
    config_class = PromptSRCConfig
    provides = frozenset({"class_text_features", "regularization_loss", "epoch_weights"})

    def build(self) -> None:
        super().build()
        self.recorded: dict[str, torch.Tensor] = {}
        self.frozen_text: torch.Tensor | None = None
        self.last_losses: dict[str, float] = {}
        image_encoder = self.vision_tower().forward
        if isinstance(image_encoder, nn.Module):  # open_clip: the visual module (encode_image's output)
            self.hook_output(image_encoder, self._record_image)

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy`` of the adapted model) starts without the last forward pass's features, which
        are part of its autograd graph and cannot be copied."""
        return {**self.__dict__, "recorded": {}}

    def _record_image(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if self.active and torch.is_grad_enabled():
            self.recorded["image"] = output[0] if isinstance(output, tuple) else output

    def text_features(self) -> torch.Tensor:
        features = super().text_features()
        if torch.is_grad_enabled():
            self.recorded["text"] = features
        return features

    # -- the frozen CLIP ------------------------------------------------------------------------------------------
    def frozen_text_features(self) -> torch.Tensor:
        """Normalised mean over PromptSRC's templates of the frozen text tower's class features (n_cls, d); computed
        once, on first use."""
        device = self.context.tokens.device
        if self.frozen_text is None or self.frozen_text.device != device:
            backbone, names = self.backbone, [n.replace("_", " ") for n in self.config.classnames]
            templates = promptsrc_templates()
            every = backbone.tokenize([t.format(name) for t in templates for name in names]).to(device)
            with torch.no_grad(), self.prompts_off():
                total = 0
                for tokens in every.split(len(names)):  # one template's prompts of every class at a time
                    total = total + backbone.encode_text_embeddings(backbone.token_embedding(tokens), tokens).float()
                self.frozen_text = F.normalize(total / len(templates), dim=-1)
        return self.frozen_text

    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised features of the frozen image tower (no prompt)."""
        with torch.no_grad(), self.prompts_off():
            return F.normalize(self.backbone.encode_image(images).float(), dim=-1)

    # -- the capabilities ---------------------------------------------------------------------------------------
    def regularization_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """``L_SCL``: the weighted L1 text and image terms and the KL term, for the logits ``outputs`` of the
        training forward pass on ``batch`` (images first) that just ran."""
        if "image" not in self.recorded or "text" not in self.recorded:
            raise RuntimeError(f"{self.name}'s regularization_loss follows a forward pass of the model with gradients")
        cfg, recorded = self.config, self.recorded
        image = F.normalize(recorded.pop("image").float(), dim=-1)
        text = recorded.pop("text").float()
        frozen_text = self.frozen_text_features()
        frozen_image = self.frozen_image_features(batch[0])
        zero_shot_logits = self.backbone.logit_scale.exp().float() * frozen_image @ frozen_text.t()
        logits = outputs.float()
        text_loss = F.l1_loss(text, frozen_text) * cfg.text_loss_weight
        image_loss = F.l1_loss(image, frozen_image) * cfg.image_loss_weight
        kl = F.kl_div(
            F.log_softmax(logits, dim=1), F.log_softmax(zero_shot_logits, dim=1), reduction="sum", log_target=True
        )
        logits_loss = kl / logits.numel() * cfg.logits_loss_weight
        self.last_losses = {
            "scl_text": text_loss.item(),
            "scl_image": image_loss.item(),
            "scl_logits": logits_loss.item(),
        }
        return text_loss + image_loss + logits_loss

    def epoch_weights(self, epochs: int) -> list[float]:
        """GPA: the weight of the trained tensors after each of the run's ``epochs`` epochs."""
        return gaussian_epoch_weights(epochs, self.config.gpa_mean, self.config.gpa_std)

    def diagnostics(self) -> dict[str, float]:
        """The three self-regulating terms of the latest ``regularization_loss`` (weighted)."""
        return dict(self.last_losses)
