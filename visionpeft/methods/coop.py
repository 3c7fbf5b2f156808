"""CoOp (Zhou et al., IJCV 2022) and CoCoOp (Zhou et al., CVPR 2022): learned prompt context for CLIP.

The prompt for class c is ``[SOS][V1..VM][CLASS c][.][EOS]`` (class token at the end; ``middle`` and ``front``
positions as in the official code). The context vectors V replace the token embeddings of placeholder words and
the frozen text tower encodes the result. CoCoOp adds a meta-network on the image feature that shifts the
context per image. Both CLIP towers stay frozen; logits are ``logit_scale * cos(image, text)``.

Task models ask for the learned prompts by capability: CoOp provides ``class_text_features()``, CoCoOp (whose
prompts depend on the image) ``image_logits(image_features)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..schema import setting
from .base import Method, MethodConfig, register_method
from .clip_fewshot import check_classnames

POSITIONS = ("end", "middle", "front")


@dataclass
class CoOpConfig(MethodConfig):
    """CoOp options; defaults are the official code's (KaiyangZhou/CoOp ``configs/trainers/CoOp``:
    ``N_CTX=16``, ``CTX_INIT=""`` (N(0, 0.02) init), ``CSC=False``, ``CLASS_TOKEN_POSITION="end"``).

    Attributes:
        classnames: The class names, in label order.
        n_ctx: Number of context vectors (ignored when ``ctx_init`` is given: its words set the count).
        ctx_init: Words to initialise the context from, e.g. ``"a photo of a"``; empty for random init.
        csc: Class-specific contexts (one set per class) instead of one unified context.
        class_token_position: ``end``, ``middle`` or ``front``.
        init_std: Standard deviation of the random context initialisation.
    """

    tower: str | None = setting("text", "the tower whose prompts are learned")
    classnames: tuple[str, ...] = setting((), "the class names, in label order (the task fills them in)")
    n_ctx: int = setting(16, "number of context vectors (ignored when ctx_init is given)", min=1)
    ctx_init: str = setting("", "words to initialise the context from; empty: random init")
    csc: bool = setting(False, "class-specific contexts instead of one unified context")
    class_token_position: str = setting("end", "where the class token goes", choices=POSITIONS)
    init_std: float = setting(0.02, "standard deviation of the random context initialisation", min=0)


@dataclass
class CoCoOpConfig(CoOpConfig):
    """CoCoOp options; official defaults ``N_CTX=4``, ``CTX_INIT="a photo of a"`` and a meta-network
    Linear(vis_dim, vis_dim // 16) - ReLU - Linear(vis_dim // 16, ctx_dim)."""

    n_ctx: int = setting(4, "number of context vectors (ignored when ctx_init is given)", min=1)
    ctx_init: str = setting("a photo of a", "words to initialise the context from; empty: random init")


class PromptContext(nn.Module):
    """Learned context vectors (and, for CoCoOp, the meta-network)."""

    def __init__(self, ctx: torch.Tensor, meta_in: int | None = None) -> None:
        super().__init__()
        self.ctx = nn.Parameter(ctx)
        if meta_in is not None:
            hidden = max(1, meta_in // 16)
            self.meta_net = nn.Sequential(
                nn.Linear(meta_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, ctx.shape[-1])
            )


@register_method
class CoOp(Method):
    name = "coop"
    config_class = CoOpConfig
    requires = {"text_prompts": "an open_clip model's text tower (it learns CLIP text prompts)"}
    provides = frozenset({"class_text_features"})
    task_inputs = ("classnames",)
    conditional = False

    def check_fits(self) -> None:
        super().check_fits()
        cfg = self.config
        if not cfg.classnames:
            raise ConfigError(f"{self.name} needs classnames (the class names in label order)")
        check_classnames(self.name, cfg.classnames)

    def initial_context(self, n_cls: int) -> tuple[torch.Tensor, str]:
        """The initial context vectors ((n_ctx, width), or (n_cls, n_ctx, width) class-specific) and the words that
        stand for them in the tokenised prompts: the embeddings of ``ctx_init``'s words, else N(0, init_std) draws
        behind ``"X X ... X"``."""
        cfg, backbone = self.config, self.backbone
        ctx_init = cfg.ctx_init.replace("_", " ").strip()
        if not ctx_init:
            shape = (n_cls, cfg.n_ctx, backbone.text_width) if cfg.csc else (cfg.n_ctx, backbone.text_width)
            return torch.empty(shape).normal_(0, cfg.init_std), " ".join(["X"] * cfg.n_ctx)
        n_ctx = len(ctx_init.split(" "))
        ctx = backbone.token_embedding(backbone.tokenize([ctx_init]))[0, 1 : 1 + n_ctx].float().clone()
        return (ctx.unsqueeze(0).repeat(n_cls, 1, 1) if cfg.csc else ctx), ctx_init

    def build(self) -> None:
        cfg, backbone = self.config, self.backbone
        names = [n.replace("_", " ") for n in cfg.classnames]
        with torch.no_grad():
            ctx, prefix = self.initial_context(len(names))
            tokens = backbone.tokenize([f"{prefix} {name}." for name in names])
            embedding = backbone.token_embedding(tokens).detach()
        n_ctx = ctx.shape[-2]
        self.n_ctx = n_ctx
        self.name_lens = [len(backbone.tokenize([name])[0].nonzero()) - 2 for name in names]
        context = PromptContext(ctx, backbone.embed_dim if self.conditional else None)
        # Frozen pieces of the prompts: [SOS] and [CLASS . EOS pad...], kept as non-persistent buffers.
        context.register_buffer("tokens", tokens, persistent=False)
        context.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)
        context.register_buffer("token_suffix", embedding[:, 1 + n_ctx :].clone(), persistent=False)
        self.context = self.add_module(backbone.model, f"text.{self.name}", context)

    def prompts(self, ctx: torch.Tensor) -> torch.Tensor:
        """Token embeddings of every class prompt for context ``ctx`` ((n_ctx, w) or (n_cls, n_ctx, w))."""
        c = self.context
        n_cls = c.token_prefix.shape[0]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
        ctx = ctx.to(c.token_prefix.dtype)
        prefix, suffix = c.token_prefix, c.token_suffix
        position = self.config.class_token_position
        if position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        rows = []
        half = self.n_ctx // 2
        for i, name_len in enumerate(self.name_lens):
            name, rest = suffix[i : i + 1, :name_len], suffix[i : i + 1, name_len:]
            if position == "middle":
                rows.append(torch.cat([prefix[i : i + 1], ctx[i : i + 1, :half], name, ctx[i : i + 1, half:], rest], 1))
            else:
                rows.append(torch.cat([prefix[i : i + 1], name, ctx[i : i + 1], rest], dim=1))
        return torch.cat(rows)

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised class text features (n_cls, d); CoCoOp: per image (batch, n_cls, d)."""
        features = self.backbone.encode_text_embeddings(self.prompts(self.context.ctx), self.context.tokens)
        return F.normalize(features, dim=-1)

    def class_text_features(self) -> torch.Tensor:
        """The ``class_text_features`` capability: L2-normalised features of every class prompt (n_cls, d)."""
        return self.text_features()

    def logits(self, images: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP logits ``logit_scale * cos(image, class prompt)`` for a batch of images.

        Args:
            images: Preprocessed images.
            text_features: Cached output of :meth:`text_features` (CoOp only), to skip the text tower.
        """
        image = F.normalize(self.backbone.encode_image(images), dim=-1)
        return self.logits_from_features(image, text_features)

    def logits_from_features(self, image: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for L2-normalised image features."""
        text = self.text_features() if text_features is None else text_features
        return self.backbone.logit_scale.exp() * image @ text.to(image.dtype).t()


@register_method
class CoCoOp(CoOp):
    name = "cocoop"
    config_class = CoCoOpConfig
    provides = frozenset({"image_logits"})
    conditional = True

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        if image_features is None:
            raise ValueError("CoCoOp's prompts depend on the image: pass image_features")
        bias = self.context.meta_net(image_features.to(self.context.ctx.dtype))  # (batch, ctx_dim)
        features = []
        for b in bias:  # one prompt set per image, as the official code (batch size 1 there)
            shifted = self.context.ctx + b
            out = self.backbone.encode_text_embeddings(self.prompts(shifted), self.context.tokens)
            features.append(F.normalize(out, dim=-1))
        return torch.stack(features)

    def logits(self, images: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits_from_features(F.normalize(self.backbone.encode_image(images), dim=-1))

    def logits_from_features(self, image: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        text = self.text_features(image)
        return self.backbone.logit_scale.exp() * torch.einsum("bd,bcd->bc", image, text.to(image.dtype))

    def image_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """The ``image_logits`` capability: logits for L2-normalised image features, prompts conditioned on them."""
        return self.logits_from_features(image_features)
