"""MaPLe (Khattak et al., CVPR 2023): the ViT-B/16 count, the official equations, the official initialisation,
save / load, training and bad input.

Official code: muzairkhattak/multimodal-prompt-learning (commit 69bce21) ``trainers/maple.py``. The reference below
(with :mod:`vl_prompt_reference` for the towers, ``clip/model.py``) is this test's own code for its equations:
``MultiModalPromptLearner.forward`` (lines 159-176: the class prompts from ``ctx``, the shallow vision prompt
``proj(ctx)`` and the deep vision prompts ``compound_prompt_projections[i](compound_prompts_text[i])``),
``CustomCLIP.forward`` (lines 189-204: text features with the deep text prompts, image features with the shallow and
deep vision prompts, ``logit_scale * cos``). Initialisation (lines 84-117): ``ctx`` from the embeddings of the first
``N_CTX`` words of ``CTX_INIT`` when ``N_CTX <= 4`` (else N(0, 0.02) behind ``"X X"``), ``proj`` a default
``nn.Linear``, ``compound_prompts_text`` N(0, 0.02), ``compound_prompt_projections`` deep copies of one default
``nn.Linear`` (``_get_clones``, lines 207-208).
"""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_vit, training_losses
from vl_prompt_reference import (
    IMAGES,
    NAMES,
    TEN_NAMES,
    clip_logits,
    logits_in_new_process,
    official_image_features,
    official_prompt_embeddings,
    official_text_features,
    perturb,
    tiny_clip_deep,
)

import visionpeft as vp
from visionpeft.adapter import backbone_of
from visionpeft.backbones.open_clip import clip_tokenize
from visionpeft.errors import ConfigError, IncompatibleMethodError
from visionpeft.tasks import CLIPClassifier, prompt_learner

TEXT_WIDTH, VISION_WIDTH = 512, 768


def test_vitb16_count_is_the_papers():
    with torch.device("meta"):
        model = open_clip.create_model("ViT-B-16", pretrained=None, device="meta")
    counts = vp.count_parameters(vp.attach(model, "maple", classnames=NAMES))
    coupling = TEXT_WIDTH * VISION_WIDTH + VISION_WIDTH  # Linear(512 -> 768)
    expected = 2 * TEXT_WIDTH + coupling + 8 * (2 * TEXT_WIDTH + coupling)  # ctx + proj, 8 deep prompts + couplings
    assert expected == 3_555_072
    assert counts["by_group"] == {"maple": expected} and counts["trainable"] == expected


def maple(depth: int = 3, batch_first: bool = True, **options):
    model = CLIPClassifier(tiny_clip_deep(batch_first=batch_first), NAMES)
    return vp.attach(model, "maple", classnames=NAMES, prompt_depth=depth, **options).eval()


def official_logits(model, images):
    """``CustomCLIP.forward`` of the official MaPLe with the attached method's tensors."""
    c, clip = prompt_learner(model).context, model.clip
    shallow_vision = F.linear(c.ctx, c.proj.weight, c.proj.bias)  # line 176: self.proj(self.ctx)
    deep_text = list(c.compound_prompts_text)
    deep_vision = [F.linear(t, layer.weight, layer.bias) for t, layer in zip(deep_text, c.compound_prompt_projections)]
    embeddings, tokens = official_prompt_embeddings(clip, c.ctx)
    text = official_text_features(clip, embeddings, tokens, deep_text)
    return clip_logits(clip, official_image_features(clip, images, shallow_vision, deep_vision), text)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_logits_equal_the_official_equations(depth, batch_first):
    model = perturb(maple(depth, batch_first))
    with torch.no_grad():
        expected = official_logits(model, IMAGES)
        torch.testing.assert_close(model(IMAGES), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prompt_learner(model).logits(IMAGES), expected, rtol=1e-5, atol=1e-5)
    assert (expected - maple(depth, batch_first)(IMAGES)).abs().max() > 1e-3  # the perturbed prompts matter


def test_initialisation_is_the_official_one():
    model = maple(depth=3, n_ctx=4, ctx_init="a photo of a")
    c, clip = prompt_learner(model).context, model.clip
    words = clip.token_embedding(clip_tokenize(["a photo of a"], clip.context_length))[0, 1:5]
    torch.testing.assert_close(c.ctx.detach(), words, rtol=0, atol=0)
    couplings = list(c.compound_prompt_projections)
    assert all(torch.equal(layer.weight, couplings[0].weight) for layer in couplings)  # copies of one layer
    assert all(torch.equal(layer.bias, couplings[0].bias) for layer in couplings)
    assert not torch.equal(c.proj.weight, couplings[0].weight)  # the shallow projection is its own draw
    bound = 1 / 32**0.5  # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = text width 32
    for layer in (c.proj, couplings[0]):
        assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
        assert layer.weight.abs().max() > 0.8 * bound
    deep = torch.cat([p.detach().flatten() for p in c.compound_prompts_text])
    assert deep.numel() == 2 * 4 * 32 and 0.015 < float(deep.std()) < 0.025 and abs(float(deep.mean())) < 0.005


def test_shallow_prompt_starts_as_the_hand_written_one():
    """n_ctx=2 replaces 'a photo' and keeps 'of a' (the official prompt is '{CTX_INIT} {class}.'), so without deep
    prompts the class text starts as zero-shot CLIP's 'a photo of a {class}.'."""
    model = maple(depth=1)
    clip = model.clip
    tokens = clip_tokenize([f"a photo of a {n}." for n in NAMES], clip.context_length)
    with torch.no_grad():
        zero_shot = F.normalize(clip.encode_text(tokens), dim=-1)
        torch.testing.assert_close(prompt_learner(model).text_features(), zero_shot, rtol=1e-6, atol=1e-6)


def test_random_context_when_no_words_or_more_than_four():
    for options in ({"ctx_init": ""}, {"n_ctx": 5}):
        model = maple(**options)
        c = prompt_learner(model).context
        n = options.get("n_ctx", 2)
        x_tokens = clip_tokenize([" ".join(["X"] * n) + f" {NAMES[0]}."], model.clip.context_length)[0]
        assert torch.equal(c.tokens[0], x_tokens)
        assert c.ctx.shape == (n, 32) and float(c.ctx.detach().abs().max()) < 0.15  # N(0, 0.02)


def test_detach_restores_both_towers_and_features_skip_the_prompts():
    model = perturb(maple())
    maps = vp.features(model, IMAGES, [0, 2])
    assert [tuple(m.shape) for m in maps] == [(4, 48, 4, 4)] * 2
    layout = backbone_of(model).tower("vision").tokens
    assert layout.extra_prefix == 2
    vp.detach(model)
    fresh = tiny_clip_deep()
    tokens = clip_tokenize(["a photo of a cat."], 32)
    with torch.no_grad():
        torch.testing.assert_close(model.clip.encode_image(IMAGES), fresh.encode_image(IMAGES), rtol=0, atol=0)
        torch.testing.assert_close(model.clip.encode_text(tokens), fresh.encode_text(tokens), rtol=0, atol=0)
    assert layout.extra_prefix == 0


def test_short_training_lowers_the_loss():
    model = vp.attach(CLIPClassifier(tiny_clip_deep(), TEN_NAMES), "maple", classnames=TEN_NAMES, prompt_depth=3)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = training_losses(model, steps=30, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # towers untouched


@pytest.mark.slow
def test_save_load_in_a_new_process(tmp_path):
    model = perturb(maple())
    with torch.no_grad():
        trained = model(IMAGES)
    vp.save_adapter(model, tmp_path / "adapter")
    torch.testing.assert_close(logits_in_new_process(tmp_path / "adapter", tmp_path), trained, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("factory", "options", "error", "words"),
    [
        (tiny_vit, {"classnames": NAMES}, IncompatibleMethodError, "text"),
        (tiny_clip_deep, {"classnames": NAMES, "prompt_depth": 4}, ConfigError, "prompt_depth=4 exceeds the 3"),
        (
            tiny_clip_deep,
            {"classnames": NAMES, "n_ctx": 3, "ctx_init": "a photo", "prompt_depth": 2},
            ConfigError,
            "2 tokens",
        ),
        (tiny_clip_deep, {}, ConfigError, "needs classnames"),
        (tiny_clip_deep, {"classnames": NAMES, "tower": "vision"}, IncompatibleMethodError, "text tower"),
    ],
    ids=["vision-only-model", "depth-beyond-the-towers", "too-few-init-words", "no-classnames", "vision-tower"],
)
def test_bad_input_is_one_line_and_changes_nothing(factory, options, error, words):
    model = factory()
    keys = set(model.state_dict())
    with pytest.raises(error) as err:
        vp.attach(model, "maple", **options)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert set(model.state_dict()) == keys and not vp.attached_methods(model)


def test_other_prompt_tokens_first_are_refused():
    model = vp.attach(tiny_clip_deep(), "vpt", num_tokens=2)
    with pytest.raises(IncompatibleMethodError, match="attach it before"):
        vp.attach(model, "maple", classnames=NAMES)
