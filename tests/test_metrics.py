"""CLIP-T / CLIP-I / DINO similarity on tiny models: the scores mean what they say."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
from PIL import Image
from timm.data import create_transform, resolve_data_config
from tiny_models import tiny_clip_bpe, tiny_vit

from visionpeft.backbones.open_clip import clip_tokenize
from visionpeft.metrics.clip_scores import ClipScorer, dino_similarity


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


def test_eval_personalization_tool_prints_the_table(tmp_path, capsys):
    import json

    import eval_personalization as tool
    import torch

    from visionpeft.cli.common import run

    vision = {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    cfg = {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}
    (tmp_path / "tiny-eval-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-eval-clip.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-eval-clip").state_dict(), tmp_path / "clip.pt")
    for folder, seed in (("gen", 0), ("ref", 1)):
        (tmp_path / folder).mkdir()
        for i, image in enumerate(_images(seed, 2)):
            image.save(tmp_path / folder / f"{i}.png")
    args = [
        "--images",
        str(tmp_path / "gen"),
        "--references",
        str(tmp_path / "ref"),
        "--prompts",
        "a photo of a dog",
        "--clip-model",
        "tiny-eval-clip",
        "--clip-pretrained",
        str(tmp_path / "clip.pt"),
    ]
    assert run(tool.main, args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| metric (2 images, 2 references)") and out[2].startswith("| CLIP-T |")
    assert out[3].startswith("| CLIP-I |") and len(out) == 4
    assert run(tool.main, [*args, "--prompts", "one", "two", "three"]) == 2
    assert "2 images but 3 prompts" in capsys.readouterr().err
