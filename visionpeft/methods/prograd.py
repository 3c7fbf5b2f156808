"""ProGrad: prompt-aligned gradient (Zhu et al., ICCV 2023), on open_clip's CLIP.

CoOp's prompt learner (:class:`~.coop.CoOp`) whose update follows the classification loss only where it does not
conflict with the zero-shot CLIP's knowledge (BeierZhu/Prompt-align, ``ProGrad.public/trainers/prograd.py`` and
``Dassl.ProGrad.pytorch/dassl/engine/trainer.py``):

* the zero-shot logits ``z`` come from the frozen CLIP with the hand-crafted prompt ``template`` (``CLIP`` lines
  220-249: normalised features, ``logit_scale.exp()``); ``g_kd`` is the gradient of the distillation loss
  ``T^2 * mean_i sum_c -softmax(z_i / T)_c log_softmax(s_i / T)_c`` of the prompted logits ``s`` (``ProGradLoss``
  lines 280-293);
* the gradient ``g`` of the classification loss is kept when ``cos(g, g_kd) >= 0`` and otherwise replaced by
  ``g - lambda * (g . g_kd_hat) g_kd_hat``, ``g_kd_hat = g_kd / |g_kd|``, for each trained tensor
  (``prograd_backward_and_update``, trainer.py lines 311-349); the distillation loss itself is not added.
* initialisation (``PromptLearner.__init__`` lines 78-105): ``n_ctx`` vectors, the last ones the embeddings of the
  words of ``ctx_init`` (the official code takes the data set's template without ``" {}."``) and the others zero,
  behind the prompt prefix ``"X ... X <ctx_init>"``; without ``ctx_init``, CoOp's N(0, 0.02) draws.

Defaults are the official ones (``configs/trainers/ProGrad/*.yaml``: ``LOSS.T 1.0``, ``TRAINER.COOP.CTX_INIT True``;
``scripts/prograd.sh``: ``LOSS.LAMBDA 1.0``, 16 context vectors; ``CUSTOM_TEMPLATES["ImageNet"]`` for the words and
the template).

How it plugs into the trainer: through the ``regularization_loss`` capability, after the forward pass, the method
computes ``g_kd`` (``torch.autograd.grad`` with the graph kept) from the logits and the image features of that pass
and returns 0; a gradient hook on the context (registered anew each step, so it also holds on a deep copy) then
projects the gradient that reaches it in the next backward pass - the classification loss's, as the official update -
once. Under gradient accumulation each micro-batch's gradient is projected against its own ``g_kd`` (the official
code does not accumulate). A ``g_kd`` of zero (logits that do not depend on the prompts) leaves the gradient alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..schema import setting
from .base import register_method
from .clip_fewshot import check_template, hand_crafted_text_features
from .coop import CoOp, CoOpConfig


@dataclass
class ProGradConfig(CoOpConfig):
    """ProGrad options: CoOp's (``TRAINER.COOP``) plus ``LOSS.LAMBDA`` and ``LOSS.T``.

    Attributes:
        ctx_init: Words for the last context vectors (the others start at zero); empty: CoOp's random init.
        template: The hand-crafted prompt of the zero-shot CLIP.
        lam: ``lambda``, how much of the conflicting component is removed (1: all of it).
        temperature: ``T`` of the distillation loss.
    """

    ctx_init: str = setting("a photo of a", "words for the last context vectors (the rest start at 0); empty: random")
    template: str = setting("a photo of a {}.", "the hand-crafted prompt ({} = class name) of the zero-shot CLIP")
    lam: float = setting(1.0, "lambda: the share of the gradient's conflicting component removed", min=0)
    temperature: float = setting(1.0, "temperature T of the distillation loss that gives the direction", above=0)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean_i sum_c -softmax(teacher_i / T)_c log_softmax(logits_i / T)_c`` (ProGrad's ``kl_loss``)."""
    target = F.softmax(teacher_logits / temperature, dim=-1)
    return (-target * F.log_softmax(logits / temperature, dim=-1)).sum(1).mean() * temperature * temperature


def project_conflict(grad: torch.Tensor, direction: torch.Tensor, lam: float) -> torch.Tensor:
    """``grad`` without ``lam`` times its component along the unit ``direction`` when they point apart
    (``grad . direction < 0``), else ``grad``."""
    dot = torch.dot(grad.flatten().float(), direction.flatten())
    if dot < 0:
        return (grad.float() - lam * dot * direction).to(grad.dtype)
    return grad


@register_method
class ProGrad(CoOp):
    name = "prograd"
    config_class = ProGradConfig
    provides = frozenset({"class_text_features", "regularization_loss"})

    def check_fits(self) -> None:
        super().check_fits()
        cfg = self.config
        check_template(self.name, "template", cfg.template)
        words = len(cfg.ctx_init.replace("_", " ").split())
        if words > cfg.n_ctx:
            raise ConfigError(
                f"{self.name} ctx_init '{cfg.ctx_init}' has {words} words, more than n_ctx={cfg.n_ctx} context "
                "vectors; raise n_ctx or shorten ctx_init"
            )

    def initial_context(self, n_cls: int) -> tuple[torch.Tensor, str]:
        """The official init: the embeddings of ``ctx_init``'s words in the last vectors, zeros before them."""
        cfg, backbone = self.config, self.backbone
        words = cfg.ctx_init.replace("_", " ").strip()
        if not words:
            return super().initial_context(n_cls)
        k = len(words.split(" "))
        ctx = torch.zeros(cfg.n_ctx, backbone.text_width, device=backbone.logit_scale.device)
        ctx[cfg.n_ctx - k :] = backbone.token_embedding(backbone.tokenize([words]))[0, 1 : 1 + k].float()
        prefix = " ".join(["X"] * (cfg.n_ctx - k) + [words])
        return (ctx.unsqueeze(0).repeat(n_cls, 1, 1) if cfg.csc else ctx), prefix

    def build(self) -> None:
        super().build()
        self.image: torch.Tensor | None = None
        self.zero_shot: torch.Tensor | None = None
        self.gradient_hook = None
        self.last_losses: dict[str, float] = {}
        vision = self.backbone.towers.get("vision")
        if vision is not None and isinstance(vision.forward, nn.Module):
            self.hook_output(vision.forward, self._record_image)

    def _record_image(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if torch.is_grad_enabled():  # a training forward pass (the image tower itself is frozen)
            self.image = (output[0] if isinstance(output, tuple) else output).detach()

    def zero_shot_text_features(self) -> torch.Tensor:
        """The zero-shot CLIP's normalised class features of ``template`` (n_cls, d), computed once."""
        device = self.context.tokens.device
        if self.zero_shot is None or self.zero_shot.device != device:
            self.zero_shot = hand_crafted_text_features(self.backbone, self.config.classnames, (self.config.template,))
        return self.zero_shot

    def zero_shot_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """The zero-shot CLIP's logits for (unnormalised) image features."""
        image = F.normalize(image_features.float(), dim=-1)
        return self.backbone.logit_scale.exp().float() * image @ self.zero_shot_text_features().t()

    def regularization_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """Sets up the projection of the next backward pass's gradient against the distillation gradient of the
        training forward pass that gave ``outputs``; adds nothing to the loss."""
        if self.image is None:
            raise RuntimeError(f"{self.name}'s regularization_loss follows a forward pass of the model with gradients")
        image, self.image = self.image, None
        kd = distillation_loss(outputs.float(), self.zero_shot_logits(image), self.config.temperature)
        ctx = self.context.ctx
        (grad,) = torch.autograd.grad(kd, [ctx], retain_graph=True, allow_unused=True)
        norm = grad.float().norm() if grad is not None else None
        pending = [grad.float() / norm] if norm is not None and norm > 0 else []
        if self.gradient_hook in self._hooks:  # the previous step's hook, spent or not
            self.gradient_hook.remove()
            self._hooks.remove(self.gradient_hook)
        self.gradient_hook = ctx.register_hook(partial(self._project, pending))
        self._hooks.append(self.gradient_hook)
        self.last_losses = {"kd_loss": float(kd.detach())}
        return outputs.new_zeros(())

    def _project(self, pending: list[torch.Tensor], grad: torch.Tensor) -> torch.Tensor | None:
        if not pending:
            return None  # spent, or no direction: the gradient as it is
        return project_conflict(grad, pending.pop(), self.config.lam)

    def diagnostics(self) -> dict[str, float]:
        """The distillation loss of the latest step (it sets the direction, it is not trained on)."""
        return dict(self.last_losses)
