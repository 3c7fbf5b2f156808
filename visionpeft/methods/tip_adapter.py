"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022), on open_clip's CLIP: a key-value cache of the few-shot
set's image features beside the zero-shot classifier.

For a normalised image feature ``f`` (gaopengcuhk/Tip-Adapter ``main.py``, ``run_tip_adapter`` lines 27-63 and
``run_tip_adapter_F`` lines 66-141; ``utils.py``):

* ``logits = 100 * f W^T + alpha * exp(-(beta - beta * f K^T)) V`` (``main.py`` lines 39-42, 91-94): ``W`` the
  normalised class features of the hand-crafted templates (``clip_classifier``, ``utils.py`` lines 18-35; the
  scale is the literal 100, OpenAI CLIP's ``logit_scale.exp()``), ``K`` the cache keys, ``V`` the one-hot labels of
  the cached images;
* the cache (``build_cache_model``, ``utils.py`` lines 38-71): every few-shot training image encoded in each of
  ``augment_epochs`` passes of the training augmentation, the unnormalised features averaged over the passes and
  normalised; built once and kept on disk (``cached_tensors``: keyed by the frozen weights' sha256 and the data);
* ``beta`` / ``alpha`` searched on the validation features (``search_hp``, ``utils.py`` lines 99-129): ``beta`` over
  ``[i * (search_scale[0] - 0.1) / search_step[0] + 0.1 for i < search_step[0]]`` (outer loop), ``alpha`` likewise
  with index 1 (inner loop), keeping the first setting of strictly highest top-1 accuracy; before the search (and
  while Tip-Adapter-F trains) they are ``init_beta`` / ``init_alpha``;
* Tip-Adapter-F trains the keys (an ``nn.Linear`` whose weight starts as ``K``, lines 69-70) with cross-entropy on
  these logits; AdamW, lr 0.001, cosine over ``train_epoch`` epochs of batch 256 (lines 72-73; ``configs/*.yaml``),
  then searches ``beta`` / ``alpha`` with the trained keys (line 132).

Defaults are ``configs/imagenet.yaml`` (``search_scale [7, 3]``, ``search_step [200, 20]``, ``init_beta 1``,
``init_alpha 1.17``, ``augment_epoch 10``) with one template, ``"a photo of a {}."`` (the other data sets' templates
are in ``datasets/*.py``; ImageNet's 7 in ``datasets/imagenet.py`` lines 177-183). Where this differs: the official
code runs CLIP in fp16 and keeps the epoch of Tip-Adapter-F with the best *test* accuracy (lines 111-126); here the
run's precision, and the checkpoint selected on the validation split (the trainer's ``best``); the cache is built
with the run's training transform (the official one crops ``scale=(0.5, 1)``).

How a run uses it (capabilities the classification trainer asks for, naming no method): ``fit_training_set`` builds
the cache from the few-shot training set before training, ``select_on_validation`` searches ``beta`` / ``alpha``
after it; ``tip_adapter`` itself has nothing to train, so a training run refuses it (``training_free``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from ..schema import setting
from .base import Method, MethodConfig, register_method
from .clip_fewshot import (
    cached_tensors,
    check_classnames,
    check_template,
    hand_crafted_text_features,
    require_text_tower,
)

#: Tip-Adapter's zero-shot logit scale (``100. * features @ clip_weights``).
CLIP_SCALE = 100.0


@dataclass
class TipAdapterConfig(MethodConfig):
    """Tip-Adapter options (the official ``configs/<dataset>.yaml`` keys).

    Attributes:
        classnames: The class names, in label order.
        templates: Hand-crafted prompts of the zero-shot classifier (features averaged over them).
        augment_epochs: Passes of the training augmentation whose features are averaged into the keys.
        init_beta: ``beta`` before the search (and while Tip-Adapter-F trains).
        init_alpha: ``alpha`` likewise.
        search_scale: The largest ``beta`` and ``alpha`` of the search grid.
        search_step: The number of ``beta`` and ``alpha`` values of the search grid.
        cache_size: Cached images; set when the cache is built (a saved adapter records it).
    """

    tower: str | None = setting("vision", "the tower whose features are cached (CLIP's image features)")
    classnames: tuple[str, ...] = setting((), "the class names, in label order (the task fills them in)")
    templates: tuple[str, ...] = setting(("a photo of a {}.",), "hand-crafted prompts ({} = class name)", nonempty=True)
    augment_epochs: int = setting(10, "augmentation passes over the few-shot set averaged into the cache keys", min=1)
    init_beta: float = setting(1.0, "beta (sharpness of the cache affinities) before the search", min=0)
    init_alpha: float = setting(1.17, "alpha (weight of the cache logits) before the search", min=0)
    search_scale: tuple[float, ...] = setting((7.0, 3.0), "largest beta and alpha of the validation search")
    search_step: tuple[int, ...] = setting((200, 20), "number of beta and alpha values of the search")
    cache_size: int = setting(0, "cached images (set when the cache is built; a saved adapter records it)", min=0)


class CacheModel(nn.Module):
    """The cache: keys (N, d) - a parameter when they train -, one-hot values (N, n_cls), ``beta`` and ``alpha``."""

    def __init__(self, size: int, dim: int, num_classes: int, trained: bool, beta: float, alpha: float) -> None:
        super().__init__()
        keys = torch.zeros(size, dim)
        if trained:
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys)
        self.register_buffer("values", torch.zeros(size, num_classes))
        self.register_buffer("beta", torch.tensor(float(beta)))
        self.register_buffer("alpha", torch.tensor(float(alpha)))


def search_values(scale: float, steps: int) -> list[float]:
    """The official grid ``[i * (scale - 0.1) / steps + 0.1 for i in range(steps)]``."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def cache_logits(affinity: torch.Tensor, values: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """``exp(-(beta - beta * affinity)) @ values``, as the official expression."""
    return ((-1) * (beta - beta * affinity)).exp() @ values


def search_beta_alpha(
    clip_logits: torch.Tensor,
    affinity: torch.Tensor,
    values: torch.Tensor,
    labels: torch.Tensor,
    scale: tuple[float, float],
    steps: tuple[int, int],
) -> tuple[float, float, int]:
    """The official search: ``(beta, alpha, correct)`` of the first grid point (beta outer, alpha inner) with the
    most correct top-1 predictions; ``(0, 0, 0)`` when no point gets any right, as the official code."""
    best = (0.0, 0.0, 0)
    for beta in search_values(scale[0], steps[0]):
        cached = cache_logits(affinity, values, beta)
        for alpha in search_values(scale[1], steps[1]):
            correct = int(((clip_logits + cached * alpha).argmax(dim=1) == labels).sum())
            if correct > best[2]:
                best = (beta, alpha, correct)
    return best


@register_method
class TipAdapter(Method):
    name = "tip_adapter"
    config_class = TipAdapterConfig
    provides = frozenset({"image_logits", "fit_training_set", "select_on_validation", "training_free"})
    task_inputs = ("classnames",)
    #: The keys train (Tip-Adapter-F).
    trains_keys = False

    @classmethod
    def training_free(cls) -> str:
        """The ``training_free`` capability: why a training run refuses this method, in one line."""
        return (
            f"{cls.name} is training-free (its cache comes from the few-shot set, beta / alpha from the validation "
            "split): evaluate it with `tools/eval_zeroshot.py --model ... --dataset ... --tip-adapter --shots N`, or "
            "train tip_adapter_f, which fine-tunes the cache keys"
        )

    def check_fits(self) -> None:
        super().check_fits()
        require_text_tower(self)
        cfg = self.config
        if self.tower.name != "vision":
            raise ConfigError(f"{self.name} caches CLIP's image features: set tower=vision (got {cfg.tower})")
        if not cfg.classnames:
            raise ConfigError(f"{self.name} needs classnames (the class names in label order)")
        check_classnames(self.name, cfg.classnames)
        for template in cfg.templates:
            check_template(self.name, "templates entry", template)
        for option, low in (("search_scale", 0), ("search_step", 1)):
            value = getattr(cfg, option)
            if len(value) != 2 or min(value) < low or not all(map(math.isfinite, value)):
                raise ConfigError(
                    f"{self.name} {option} must be two numbers (beta, alpha) of at least {low}, got {list(value)}"
                )

    def build(self) -> None:
        cfg = self.config
        cache = CacheModel(
            cfg.cache_size,
            self.backbone.embed_dim,
            len(cfg.classnames),
            self.trains_keys,
            cfg.init_beta,
            cfg.init_alpha,
        )
        self.cache = self.add_module(self.tower.forward, self.name, cache)
        self.text: torch.Tensor | None = None
        self.last_search: dict[str, float] = {}

    # -- the classifier ---------------------------------------------------------------------------------------
    def zero_shot_text_features(self) -> torch.Tensor:
        """``W``: the normalised class features of the templates (n_cls, d), computed once."""
        device = self.backbone.logit_scale.device
        if self.text is None or self.text.device != device:
            self.text = hand_crafted_text_features(self.backbone, self.config.classnames, self.config.templates)
        return self.text

    def image_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """The ``image_logits`` capability: Tip-Adapter's logits for L2-normalised image features."""
        if self.cache.keys.shape[0] == 0:
            raise ConfigError(
                f"{self.name}'s cache is empty: build it from the few-shot training set first (fit_training_set)"
            )
        cache, f = self.cache, image_features.float()
        clip_logits = CLIP_SCALE * f @ self.zero_shot_text_features().t()
        affinity = f @ cache.keys.float().t()
        return clip_logits + cache_logits(affinity, cache.values.float(), cache.beta.float()) * cache.alpha.float()

    # -- the cache ------------------------------------------------------------------------------------------------
    def set_cache(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Makes normalised ``keys`` (N, d) with their ``labels`` (N,) the cache (``cache_size`` becomes N)."""
        cache, device = self.cache, self.cache.values.device
        keys = keys.to(device=device, dtype=cache.keys.dtype)
        if self.trains_keys:
            cache.keys = nn.Parameter(keys.clone())
        else:
            cache.keys = keys.clone()
        cache.values = F.one_hot(labels.long().to(device), len(self.config.classnames)).to(cache.values.dtype)
        self.config = dataclasses.replace(self.config, cache_size=int(keys.shape[0]))

    def encode_images(self, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen tower's (unnormalised, float32) image features and the labels of ``loader``'s items."""
        device = self.backbone.logit_scale.device
        features, labels = [], []
        with torch.no_grad():
            for images, targets in loader:
                features.append(self.backbone.encode_image(images.to(device)).float())
                labels.append(torch.as_tensor(targets).to(device))
        return torch.cat(features), torch.cat(labels)

    def cache_features(self, dataset: Dataset, batch_size: int, num_workers: int, seed: int) -> dict[str, torch.Tensor]:
        """The official cache of ``dataset`` (its transform augments): features averaged over ``augment_epochs``
        passes, normalised, and the labels; the passes draw from their own generator seeded with ``seed``, so the
        caller's random state is the same whether the cache is computed or read from disk."""
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        total, labels = None, None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(self.config.augment_epochs):
                features, labels = self.encode_images(loader)
                total = features if total is None else total + features
        return {"keys": F.normalize(total / self.config.augment_epochs, dim=-1), "labels": labels}

    def fit_training_set(
        self,
        dataset: Dataset,
        *,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        cache_root: Path | None = None,
        cache_fields: dict[str, Any] | None = None,
    ) -> Path | None:
        """The ``fit_training_set`` capability: builds the cache from the few-shot training set ``dataset`` (items
        ``(augmented image tensor, label)``), or reads it from ``cache_root`` when a run with the same
        ``cache_fields`` (the trainer's: weights sha256, data, seed) and the same method settings built it.

        Returns:
            The cache file (None without ``cache_root``).
        """
        if len(dataset) == 0:
            raise ConfigError(f"{self.name} needs a few-shot training set to cache; the one given is empty")
        fields = {
            **(cache_fields or {}),
            "cache": "tip_adapter",
            "augment_epochs": self.config.augment_epochs,
            "items": len(dataset),
            "seed": seed,
        }
        tensors, path = cached_tensors(
            cache_root, fields, lambda: self.cache_features(dataset, batch_size, num_workers, seed)
        )
        self.set_cache(tensors["keys"], tensors["labels"])
        return path

    def select_on_validation(self, loader: DataLoader) -> dict[str, float]:
        """The ``select_on_validation`` capability: the official search of ``beta`` / ``alpha`` on ``loader``'s
        images (with the current keys); sets them and returns them with the validation top-1 they reach."""
        cfg = self.config
        features, labels = self.encode_images(loader)
        features = F.normalize(features, dim=-1)
        with torch.no_grad():
            clip_logits = CLIP_SCALE * features @ self.zero_shot_text_features().t()
            affinity = features @ self.cache.keys.float().t()
            beta, alpha, correct = search_beta_alpha(
                clip_logits, affinity, self.cache.values.float(), labels, cfg.search_scale, cfg.search_step
            )
            self.cache.beta.fill_(beta)
            self.cache.alpha.fill_(alpha)
        self.last_search = {"beta": beta, "alpha": alpha, "val_top1": correct / max(1, len(labels))}
        return dict(self.last_search)

    def diagnostics(self) -> dict[str, float]:
        """The latest search's ``beta``, ``alpha`` and validation top-1."""
        return dict(self.last_search)


@dataclass
class TipAdapterFConfig(TipAdapterConfig):
    """Tip-Adapter-F options: Tip-Adapter's (the training recipe, ``lr`` / ``train_epoch``, is the run's)."""


@register_method
class TipAdapterF(TipAdapter):
    name = "tip_adapter_f"
    config_class = TipAdapterFConfig
    provides = frozenset({"image_logits", "fit_training_set", "select_on_validation"})
    trains_keys = True
