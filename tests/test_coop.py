"""CoOp / CoCoOp on a tiny open_clip model with the real CLIP tokenizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_clip_bpe, tiny_vit

import visionpeft as vp
from visionpeft.backbones.open_clip import clip_tokenize
from visionpeft.errors import ConfigError, IncompatibleMethodError
from visionpeft.tasks import prompt_learner

NAMES = ("golden retriever", "tabby cat", "fire truck")


def _hand_written(model, template: str) -> torch.Tensor:
    tokens = clip_tokenize([template.format(n) for n in NAMES], model.context_length)
    return F.normalize(model.encode_text(tokens), dim=-1)


def test_init_from_words_reproduces_the_hand_written_prompt():
    model = vp.attach(tiny_clip_bpe(), "coop", classnames=NAMES, ctx_init="a photo of a")
    learner = prompt_learner(model)
    assert learner.context.ctx.shape == (4, 32)
    with torch.no_grad():
        torch.testing.assert_close(learner.text_features(), _hand_written(model, "a photo of a {}."), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("position", "template"),
    [("end", "a photo of a {}."), ("middle", "a photo {} of a."), ("front", "{} a photo of a.")],
)
def test_class_token_positions_lay_out_tokens_like_the_official_code(position, template):
    model = vp.attach(tiny_clip_bpe(), "coop", classnames=NAMES, ctx_init="a photo of a", class_token_position=position)
    learner = prompt_learner(model)
    tokens = clip_tokenize([template.format(n) for n in NAMES], model.context_length)
    with torch.no_grad():
        expected = model.token_embedding(tokens)
        # Same embeddings except past the end-of-text token, where the official layout keeps the template's padding.
        prompts = learner.prompts(learner.context.ctx)
    for i in range(len(NAMES)):
        eot = int(tokens[i].argmax())
        torch.testing.assert_close(prompts[i, : eot + 1], expected[i, : eot + 1], rtol=0, atol=0)


def test_random_and_class_specific_contexts_have_the_paper_shapes():
    model = vp.attach(tiny_clip_bpe(), "coop", classnames=NAMES, csc=True)
    assert prompt_learner(model).context.ctx.shape == (3, 16, 32)
    assert vp.count_parameters(model)["by_group"] == {"coop": 3 * 16 * 32}
    assert vp.count_parameters(model)["trainable"] == 3 * 16 * 32
    std = prompt_learner(vp.attach(tiny_clip_bpe(), "coop", classnames=NAMES)).context.ctx.detach().std()
    assert 0.015 < float(std) < 0.025


def _train(model, steps=15, lr=0.05):
    learner = prompt_learner(model)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.SGD([p for _, p in vp.trainable_parameters(model)], lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(learner.logits(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, images


@pytest.mark.slow
@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_training_lowers_the_loss_and_prompts_reload(method, tmp_path):
    model = vp.attach(tiny_clip_bpe(), method, classnames=NAMES)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses, images = _train(model)
    assert losses[-1] < losses[0] * 0.8
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # towers untouched
    with torch.no_grad():
        logits = prompt_learner(model).logits(images)
    vp.save_adapter(model, tmp_path)
    fresh = vp.load_adapter(tiny_clip_bpe(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(prompt_learner(fresh).logits(images), logits, rtol=0, atol=0)


def test_cocoop_meta_network_has_the_official_shape():
    model = vp.attach(tiny_clip_bpe(), "cocoop", classnames=NAMES)
    d, w = 16, 32  # image embedding width, text width
    assert vp.count_parameters(model)["by_group"]["cocoop"] == 4 * w + (d * (d // 16) + d // 16) + (d // 16 * w + w)


def test_cached_text_features_give_the_same_logits():
    model = vp.attach(tiny_clip_bpe(), "coop", classnames=NAMES)
    learner = prompt_learner(model)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(learner.logits(images, learner.text_features()), learner.logits(images))


def test_coop_needs_clip_text_and_classnames():
    with pytest.raises(IncompatibleMethodError, match="needs an open_clip model's text tower"):
        vp.attach(tiny_vit(), "coop", classnames=NAMES, tower="vision")
    with pytest.raises(ConfigError, match="needs classnames"):
        vp.attach(tiny_clip_bpe(), "coop")
