"""CLIP-T / CLIP-I / DINO similarity on tiny models: the scores mean what they say."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
from PIL import Image
from timm.data import create_transform, resolve_data_config
from tiny_models import tiny_clip_bpe, tiny_vit

from visionpeft.backbones.clip_classifier import clip_tokenize
from visionpeft.metrics import ClipScorer, dino_similarity


def _images(seed, n=3):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def scorer():
    preprocess = open_clip.image_transform(32, is_train=False)
    return ClipScorer(tiny_clip_bpe(), preprocess, lambda texts: clip_tokenize(texts, 32))


def test_clip_i_of_identical_sets_is_highest(scorer):
    a, b = _images(0), _images(1)
    same = scorer.clip_i(a[:1], a[:1])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert scorer.clip_i(a, b) < same


def test_clip_t_is_the_mean_cosine_with_each_prompt(scorer):
    images, prompts = _images(2, 2), ["a photo of a dog", "a red car"]
    manual = (
        sum(float(scorer.image_features([im]) @ scorer.text_features([p]).t()) for im, p in zip(images, prompts)) / 2
    )
    assert scorer.clip_t(images, prompts) == pytest.approx(manual, abs=1e-5)
    with pytest.raises(ValueError):
        scorer.clip_t(images, prompts[:1])


def test_dino_similarity():
    model = tiny_vit()
    preprocess = create_transform(**resolve_data_config({"input_size": (3, 32, 32)}, model=model))
    a = _images(3, 2)
    assert dino_similarity(model, preprocess, a[:1], a[:1]) == pytest.approx(1.0, abs=1e-5)
    assert dino_similarity(model, preprocess, a, _images(4, 2)) < 1.0
