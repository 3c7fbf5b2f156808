"""IVLP and PromptSRC (Khattak et al.): the ViT-B/16 count, the official equations and losses, the official
initialisation, Gaussian prompt aggregation in the training loop, save / load, training and bad input.

Official code, read for this test's own reference (with :mod:`vl_prompt_reference` for the towers):

* muzairkhattak/multimodal-prompt-learning (commit 69bce21) ``trainers/independentVL.py``: ``VLPromptLearner``
  (lines 82-114: ``ctx`` from the first ``N_CTX_TEXT`` words of ``CTX_INIT``), ``CustomCLIP.forward`` (lines
  164-179); ``clip/model.py``: the shallow vision prompt ``VisionTransformer.VPT`` (lines 373-378, N(0, 0.02)) and
  the per-block prompts ``ResidualAttentionBlock_IVLP.VPT_shallow`` of blocks ``1 .. depth - 1`` (lines 210-221,
  N(0, 0.02)).
* muzairkhattak/PromptSRC (commit bb95c77) ``trainers/promptsrc.py``: the frozen text features (lines 113-128: the
  mean over ``IMAGENET_TEMPLATES`` of the frozen ``encode_text``, normalised at line 200), the frozen image features
  and zero-shot logits (lines 201-205), the losses (lines 299-313: L1 text x 25, L1 image x 10, KL summed over
  ``logits.numel()``), GPA (lines 265-270 the normalised Gaussian over epochs 1 .. N, ``get_gauss`` lines 358-360;
  lines 320-335: after each epoch the state dict times that epoch's weight is added, the sum loaded at the end);
  ``trainers/imagenet_templates.py`` lines 3-64 (the 60 templates).
"""

from __future__ import annotations

import copy
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_vit, training_losses
from torch.utils.data import DataLoader, TensorDataset
from vl_prompt_reference import (
    IMAGES,
    LABELS,
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
from visionpeft.backbones.open_clip import clip_tokenize
from visionpeft.errors import ConfigError, IncompatibleMethodError
from visionpeft.methods.promptsrc import gaussian_epoch_weights, promptsrc_templates
from visionpeft.tasks import CLIPClassifier, prompt_learner
from visionpeft.trainers.classification import ClassificationObjective
from visionpeft.trainers.loop import Loop, LoopConfig, make_accelerator

DEPTHS = {"prompt_depth_text": 3, "prompt_depth_vision": 3}


@pytest.mark.parametrize("method", ["ivlp", "promptsrc"])
def test_vitb16_count_is_the_papers(method):
    with torch.device("meta"):
        model = open_clip.create_model("ViT-B-16", pretrained=None, device="meta")
    counts = vp.count_parameters(vp.attach(model, method, classnames=NAMES))
    expected = 9 * 4 * 512 + 9 * 4 * 768  # 4 text + 4 vision tokens in 9 layers of each tower
    assert expected == 46_080
    assert counts["by_group"] == {method: expected} and counts["trainable"] == expected


def attached(method: str = "ivlp", batch_first: bool = True, names=NAMES, **options):
    model = CLIPClassifier(tiny_clip_deep(batch_first=batch_first), names)
    return vp.attach(model, method, classnames=names, **{**DEPTHS, **options}).eval()


def official_features(model, images):
    """Prompted (image, text) features of the official IVLP ``CustomCLIP`` with the attached method's tensors."""
    c, clip = prompt_learner(model).context, model.clip
    vision = list(c.vision)
    image = official_image_features(clip, images, vision[0] if vision else None, vision[1:])
    embeddings, tokens = official_prompt_embeddings(clip, c.ctx)
    return image, official_text_features(clip, embeddings, tokens, list(c.text))


@pytest.mark.parametrize(
    ("options", "batch_first"),
    [(DEPTHS, True), (DEPTHS, False), ({"prompt_depth_text": 1, "prompt_depth_vision": 2, "n_ctx_vision": 3}, True)]
    + [({"prompt_depth_text": 2, "prompt_depth_vision": 0, "n_ctx_text": 2}, True)],
    ids=["depth-3", "seq-first", "shallow-text", "no-vision-prompts"],
)
def test_ivlp_logits_equal_the_official_equations(options, batch_first):
    model = perturb(attached("ivlp", batch_first, **options))
    with torch.no_grad():
        expected = clip_logits(model.clip, *official_features(model, IMAGES))
        torch.testing.assert_close(model(IMAGES), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prompt_learner(model).logits(IMAGES), expected, rtol=1e-5, atol=1e-5)


def test_ivlp_initialisation_is_the_official_one():
    model = attached("ivlp")
    c, clip = prompt_learner(model).context, model.clip
    words = clip.token_embedding(clip_tokenize(["a photo of a"], clip.context_length))[0, 1:5]
    torch.testing.assert_close(c.ctx.detach(), words, rtol=0, atol=0)
    assert [tuple(p.shape) for p in c.text] == [(4, 32)] * 2  # text blocks 1, 2 (the input is the class prompt)
    assert [tuple(p.shape) for p in c.vision] == [(4, 48)] * 3  # the embedded image, vision blocks 1, 2
    deep = torch.cat([p.detach().flatten() for p in [*c.text, *c.vision]])
    assert 0.015 < float(deep.std()) < 0.025 and abs(float(deep.mean())) < 0.005


def test_prompts_off_is_the_frozen_clip():
    model = perturb(attached("promptsrc"))
    learner, fresh = prompt_learner(model), tiny_clip_deep()
    tokens = clip_tokenize(["a photo of a cat."], 32)
    with torch.no_grad(), learner.prompts_off():
        torch.testing.assert_close(model.clip.encode_image(IMAGES), fresh.encode_image(IMAGES), rtol=0, atol=0)
        torch.testing.assert_close(model.clip.encode_text(tokens), fresh.encode_text(tokens), rtol=0, atol=0)


def test_promptsrc_templates_are_the_official_sixty():
    templates = promptsrc_templates()
    assert len(templates) == len(set(templates)) == 60
    assert templates[:3] == ["a photo of a {}.", "a bad photo of a {}.", "a photo of many {}."]
    assert templates[-3:] == ["a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}."]
    assert "itap of a {}." not in templates and "a plushie {}." not in templates  # two of CLIP's other 20


def official_frozen_text(clip, names=NAMES):
    """Lines 122-128 and 200: per template the frozen features of every class, averaged, then normalised."""
    tokens = clip_tokenize([t.format(n) for t in TEMPLATES for n in names], clip.context_length)
    features = clip.encode_text(tokens).unflatten(0, (len(TEMPLATES), len(names)))  # (templates, classes, d)
    return F.normalize(features.mean(dim=0), dim=-1)


TEMPLATES = promptsrc_templates()


def official_scl(model, images, frozen_clip, weights=(25.0, 10.0, 1.0)):
    """``L_SCL`` of ``PromptSRC.forward_backward`` (lines 297-312) and the prompted logits, on the same weights."""
    image, text = official_features(model, images)
    logits = clip_logits(model.clip, image, text)
    fixed = official_frozen_text(frozen_clip)
    zero_shot = F.normalize(frozen_clip.encode_image(images), dim=-1)
    zero_shot_logits = model.clip.logit_scale.exp() * zero_shot @ fixed.t()
    text_loss = (F.normalize(text, dim=-1) - fixed).abs().mean() * weights[0]
    image_loss = (F.normalize(image, dim=-1) - zero_shot).abs().mean() * weights[1]
    p_zero_shot, log_p = zero_shot_logits.softmax(1), logits.log_softmax(1)
    kl = (p_zero_shot * (p_zero_shot.log() - log_p)).sum() / logits.numel() * weights[2]
    return logits, {"scl_text": text_loss, "scl_image": image_loss, "scl_logits": kl}


@pytest.mark.parametrize("weights", [(25.0, 10.0, 1.0), (3.0, 0.5, 2.0)], ids=["official", "other-weights"])
def test_promptsrc_losses_equal_the_official_ones(weights):
    options = dict(zip(("text_loss_weight", "image_loss_weight", "logits_loss_weight"), weights))
    model = perturb(attached("promptsrc", **options))
    learner = prompt_learner(model)
    vp.set_train_mode(model, True)
    logits = model(IMAGES)
    loss = learner.regularization_loss(logits, (IMAGES, LABELS))
    with torch.no_grad():
        torch.testing.assert_close(learner.frozen_text_features(), official_frozen_text(tiny_clip_deep()))
        expected_logits, terms = official_scl(model, IMAGES, tiny_clip_deep(), weights)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, sum(terms.values()), rtol=1e-5, atol=1e-6)
    for name, value in learner.diagnostics().items():
        assert math.isclose(value, float(terms[name]), rel_tol=1e-4, abs_tol=1e-6), name
    assert all(float(t) > 0 for t in terms.values())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in vp.trainable_parameters(model))


def test_the_classification_objective_adds_the_method_losses():
    model = perturb(attached("promptsrc"))
    vp.set_train_mode(model, True)
    plain = ClassificationObjective(3, None).loss(model, (IMAGES, LABELS))
    total = ClassificationObjective(3, None, adapted=model).loss(model, (IMAGES, LABELS))
    with torch.no_grad():
        logits, terms = official_scl(model, IMAGES, tiny_clip_deep())
    torch.testing.assert_close(plain, F.cross_entropy(logits, LABELS), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, F.cross_entropy(logits, LABELS) + sum(terms.values()), rtol=1e-5, atol=1e-5)
    ivlp = perturb(attached("ivlp"))  # no regularization_loss: the objective is cross-entropy alone
    assert ClassificationObjective(3, None, adapted=ivlp).regularizers == []


def test_a_model_copied_after_a_training_step_works():
    """The features recorded for regularization_loss belong to one forward pass: a deep copy leaves them behind."""
    model = attached("promptsrc")
    vp.set_train_mode(model, True)
    model(IMAGES)
    copied = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="follows a forward pass"):
        prompt_learner(copied).regularization_loss(model(IMAGES), (IMAGES, LABELS))
    assert prompt_learner(copied).regularization_loss(copied(IMAGES), (IMAGES, LABELS)) > 0


def official_gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    gauss = [
        (1 / (std * math.sqrt(2 * math.pi))) * math.exp(-0.5 * ((a - mean) / std) ** 2) for a in range(1, epochs + 1)
    ]
    return [g / sum(gauss) for g in gauss]


@pytest.mark.parametrize(("epochs", "mean", "std"), [(20, 15, 1), (50, 30, 30), (3, 2, 1)])
def test_gpa_weights_are_the_official_gaussian(epochs, mean, std):
    weights = gaussian_epoch_weights(epochs, mean, std)
    for got, expected in zip(weights, official_gpa_weights(epochs, mean, std), strict=True):
        assert math.isclose(got, expected, rel_tol=1e-12)
    assert math.isclose(sum(weights), 1.0)
    with pytest.raises(ConfigError, match="weight 0") as err:
        gaussian_epoch_weights(5, 5000.0, 1.0)
    assert "\n" not in str(err.value)


def gpa_loop(run_dir, epochs=3, ema_decay=None):
    """The shared training loop on a tiny PromptSRC classifier: 8 images, batches of 4 (2 steps an epoch)."""
    model = attached("promptsrc", gpa_mean=2.0, gpa_std=1.0)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=generator), torch.arange(8) % 3)
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = LoopConfig(epochs=epochs, log_every=1, ema_decay=ema_decay)
    optimizer = torch.optim.SGD([p for _, p in vp.trainable_parameters(model)], lr=0.05)
    objective = ClassificationObjective(3, None, adapted=model)
    accelerator = make_accelerator(cfg, cpu=True)
    return Loop(model, objective, optimizer, loader, run_dir, cfg, accelerator, select_best=False)


def test_the_finished_run_holds_the_gaussian_average_of_its_epochs(tmp_path):
    loop = gpa_loop(tmp_path / "gpa")
    learner = prompt_learner(loop.unwrapped)
    ends = []  # the trained tensors after every epoch
    end_epoch = loop._end_epoch
    loop._end_epoch = lambda: (ends.append([p.detach().clone() for p in learner.parameters()]), end_epoch())
    loop.fit()
    weights = official_gpa_weights(3, 2.0, 1.0)
    assert len(ends) == 3
    for i, p in enumerate(learner.parameters()):
        expected = sum(w * epoch[i] for w, epoch in zip(weights, ends))
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(expected, ends[-1][i])  # the average is not the last epoch


def test_a_resumed_run_continues_the_average_exactly(tmp_path):
    straight = gpa_loop(tmp_path / "straight")
    straight.fit()
    first = gpa_loop(tmp_path / "split")
    first.fit(stop_after=1)
    assert (tmp_path / "split" / "state" / "epoch_average.safetensors").is_file()
    resumed = gpa_loop(tmp_path / "split")
    resumed.load_state()
    assert resumed.average.added == 1
    resumed.fit()
    for (name, p), (_, q) in zip(
        vp.trainable_parameters(resumed.unwrapped), vp.trainable_parameters(straight.unwrapped)
    ):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_ema_beside_the_average_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="train.ema_decay") as err:
        gpa_loop(tmp_path / "both", ema_decay=0.9)
    assert "\n" not in str(err.value)


def test_short_training_lowers_the_loss():
    model = attached("ivlp", names=TEN_NAMES)
    losses = training_losses(model, steps=30, lr=3e-3)
    assert losses[-1] < 0.7 * losses[0]
    model = attached("promptsrc", names=TEN_NAMES)
    objective = ClassificationObjective(10, None, adapted=model)
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32, generator=generator), torch.arange(8) % 10
    optimizer = torch.optim.AdamW([p for _, p in vp.trainable_parameters(model)], lr=3e-3)
    vp.set_train_mode(model, True)
    losses = []
    for _ in range(30):
        loss = objective.loss(model, (images, labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ivlp", "promptsrc"])
def test_save_load_in_a_new_process(method, tmp_path):
    model = perturb(attached(method))
    with torch.no_grad():
        trained = model(IMAGES)
    vp.save_adapter(model, tmp_path / "adapter")
    torch.testing.assert_close(logits_in_new_process(tmp_path / "adapter", tmp_path), trained, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("factory", "options", "error", "words"),
    [
        (tiny_vit, {}, IncompatibleMethodError, "text"),
        (
            tiny_clip_deep,
            {**DEPTHS, "prompt_depth_vision": 4},
            ConfigError,
            "prompt_depth_vision=4 exceeds the 3 blocks",
        ),
        (tiny_clip_deep, {**DEPTHS, "prompt_depth_text": 5}, ConfigError, "prompt_depth_text=5 exceeds the 3 blocks"),
        (tiny_clip_deep, {"prompt_depth_text": 0}, ConfigError, "prompt_depth_text"),
    ],
    ids=["vision-only-model", "vision-depth", "text-depth", "no-text-prompt"],
)
@pytest.mark.parametrize("method", ["ivlp", "promptsrc"])
def test_bad_input_is_one_line_and_changes_nothing(method, factory, options, error, words):
    model = factory()
    keys = set(model.state_dict())
    with pytest.raises(error) as err:
        vp.attach(model, method, classnames=NAMES, **options)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert set(model.state_dict()) == keys and not vp.attached_methods(model)


def test_bad_gpa_std_is_one_line():
    with pytest.raises(ConfigError, match="gpa_std") as err:
        attached("promptsrc", gpa_std=0.0)
    assert "\n" not in str(err.value)
