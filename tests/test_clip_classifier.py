"""CLIP as a classifier: zero-shot, learned prompts, a text-initialised head, methods on either tower."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_clip_bpe

import visionpeft as vp
from visionpeft.backbones.open_clip import clip_tokenize
from visionpeft.tasks import CLIPClassifier

NAMES = ("golden retriever", "tabby cat", "fire truck")
IMAGES = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


def _zero_shot(clip, templates):
    with torch.no_grad():
        text = []
        for name in NAMES:
            t = F.normalize(clip.encode_text(clip_tokenize([tp.format(name) for tp in templates], 32)), dim=-1)
            text.append(F.normalize(t.mean(0), dim=-1))
        image = F.normalize(clip.encode_image(IMAGES), dim=-1)
        return clip.logit_scale.exp() * image @ torch.stack(text).t()


def _train(model, steps=10, lr=0.05):
    optimizer = torch.optim.SGD([p for _, p in vp.trainable_parameters(model)], lr=lr, momentum=0.9)
    vp.set_train_mode(model, True)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(IMAGES), LABELS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def test_zero_shot_single_template_and_ensemble():
    clip = tiny_clip_bpe()
    templates = ("a photo of a {}.", "a drawing of a {}.", "itap of a {}.")
    with torch.no_grad():
        torch.testing.assert_close(CLIPClassifier(clip, NAMES)(IMAGES), _zero_shot(clip, ("a photo of a {}.",)))
        torch.testing.assert_close(CLIPClassifier(clip, NAMES, templates)(IMAGES), _zero_shot(clip, templates))


def test_text_initialised_head_starts_as_zero_shot_and_trains_with_vision_lora(tmp_path):
    model = CLIPClassifier(tiny_clip_bpe(), NAMES, head=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), _zero_shot(model.clip, ("a photo of a {}.",)), rtol=1e-5, atol=1e-5)
    vp.attach(model, "lora", r=2, targets=["q", "v"])
    groups = vp.count_parameters(model)["by_group"]
    assert groups["head"] == 3 * 16 + 3 and groups["lora"] == 2 * 2 * (32 * 2 + 2 * 32)
    losses = _train(model)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        trained = model(IMAGES)
    vp.save_adapter(model, tmp_path)
    fresh = vp.load_adapter(CLIPClassifier(tiny_clip_bpe(), NAMES, head=True), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(IMAGES), trained, rtol=0, atol=0)


def test_coop_classifier_matches_zero_shot_at_init_and_caches_text_in_eval():
    model = vp.attach(CLIPClassifier(tiny_clip_bpe(), NAMES), "coop", classnames=NAMES, ctx_init="a photo of a").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), _zero_shot(model.clip, ("a photo of a {}.",)), rtol=1e-5, atol=1e-5)
    calls = []
    handle = model.clip.token_embedding.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(IMAGES)
        model(IMAGES)
    handle.remove()
    assert calls == []  # text features came from the cache
    losses = _train(model)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_text_tower_lora_trains_through_the_class_prompts():
    model = vp.attach(CLIPClassifier(tiny_clip_bpe(), NAMES), "lora", tower="text", r=2, targets=["q", "v", "o"])
    losses = _train(model, lr=0.1)
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for n, p in vp.trainable_parameters(model))


def test_class_text_features_are_computed_once_while_the_text_side_is_frozen(monkeypatch):
    """Vision-tower LoRA trains against fixed class text: one text encoding for many training steps; with CoOp the
    text side trains, so every step encodes its prompts again."""
    for method, options, expected in (("lora", {"r": 2}, 1), ("coop", {"classnames": NAMES}, 3)):
        model = vp.attach(CLIPClassifier(tiny_clip_bpe(), NAMES), method, **options)
        calls = []
        monkeypatch.setattr(model, "zero_shot_text_features", _counting(model.zero_shot_text_features, calls))
        learner = model._provider("class_text_features")
        if learner is not None:  # CoOp's class text comes from its learned prompts
            monkeypatch.setattr(learner, "class_text_features", _counting(learner.class_text_features, calls))
        vp.set_train_mode(model, True)
        for _ in range(3):
            model(IMAGES).sum().backward()
        assert len(calls) == expected, method


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


def test_class_prompts_use_the_tokenizer_the_model_was_created_with():
    from open_clip.tokenizer import SimpleTokenizer

    seen = []

    def tokenizer(texts, context_length):
        seen.extend(texts)
        return SimpleTokenizer(context_length=context_length)(texts)

    clip = tiny_clip_bpe()
    clip.__dict__["_visionpeft_tokenizer"] = tokenizer  # what the model factory records (open_clip.get_tokenizer)
    CLIPClassifier(clip, ["cat", "dog"]).zero_shot_text_features()
    assert seen == ["a photo of a cat.", "a photo of a dog."]
