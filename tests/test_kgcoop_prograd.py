"""KgCoOp (Yao et al., CVPR 2023) and ProGrad (Zhu et al., ICCV 2023): the ViT-B/16 counts, logits and losses equal
to a test-side reference of the official equations, the official initialisation, the projected gradient through the
classification trainer's objective, training, reload in a new process and one-line refusals.

Official code: htyao89/KgCoOp (commit c43ccc3) ``KgCoOp/trainers/kgcoop.py``: ``PromptLearner.__init__`` lines 94-104
(4 context vectors from ``"a photo of a"``) and 136-146 (the hand-crafted features ``t0``), ``CustomCLIP.forward``
lines 223-243 (``logit_scale * image @ text.t()``; ``score = 1 - mean(CosineSimilarity(dim=1, eps=1e-07)(text,
t0))``), ``forward_backward`` lines 309-311 (``cross_entropy(output, label) + self.w * score``).
BeierZhu/Prompt-align (commit 1b76203) ``ProGrad.public/trainers/prograd.py``: ``PromptLearner.__init__`` lines 78-95
(zeros, then the embeddings of the init words in the last vectors, prefix ``"X .. X <words>"``), ``CLIP.forward``
lines 240-249 (zero-shot logits), ``ProGradLoss`` lines 285-293 (``kl_loss = sum(-softmax(t / T) * log_softmax(s /
T) * T * T, 1).mean()``); ``Dassl.ProGrad.pytorch/dassl/engine/trainer.py`` ``prograd_backward_and_update`` lines
311-349 (``p.grad = a - lambda * dot(a, b_hat) * b_hat`` where ``dot(a_hat, b_hat) < 0``, ``a`` the cross-entropy
gradient, ``b`` the distillation gradient). The text encoder is :func:`clip_fewshot_reference.official_text_features`.
"""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from clip_fewshot_reference import (
    IMAGES,
    LABELS,
    NAMES,
    TEN_NAMES,
    hand_crafted,
    logits_in_new_process,
    objective_losses,
    official_text_features,
    perturb,
    prompt_embeddings,
    tokens_of,
)
from tiny_models import tiny_clip_bpe, tiny_vit

import visionpeft as vp
from visionpeft.errors import ConfigError, IncompatibleMethodError
from visionpeft.methods import make_config
from visionpeft.tasks import CLIPClassifier, prompt_learner
from visionpeft.trainers.classification import ClassificationObjective

TEMPLATE = "a photo of a {}."


def classifier(method: str, **options):
    return vp.attach(CLIPClassifier(tiny_clip_bpe(), NAMES), method, classnames=NAMES, **options)


def official_student_logits(clip, ctx: torch.Tensor, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``CustomCLIP.forward``: the logits and the normalised class text features of the learned prompts."""
    prompts, tokens = prompt_embeddings(clip, ctx, prefix)
    text = F.normalize(official_text_features(clip, prompts, tokens), dim=-1)
    image = F.normalize(clip.encode_image(IMAGES), dim=-1)
    return clip.logit_scale.exp() * image @ text.t(), text


@pytest.mark.parametrize(("method", "expected"), [("kgcoop", 4 * 512), ("prograd", 16 * 512)])
def test_vitb16_counts(method, expected):
    with torch.device("meta"):
        model = open_clip.create_model("ViT-B-16", pretrained=None, device="meta")
    counts = vp.count_parameters(vp.attach(model, method, classnames=NAMES))
    assert counts["by_group"] == {method: expected} and counts["trainable"] == expected


def test_kgcoop_logits_and_loss_equal_the_official_equations():
    model = perturb(classifier("kgcoop"))
    ctx = prompt_learner(model).context.ctx.detach()
    clip = tiny_clip_bpe()
    with torch.no_grad():
        logits, text = official_student_logits(clip, ctx, "a photo of a")
        score = 1 - F.cosine_similarity(text, hand_crafted(clip, TEMPLATE), dim=1, eps=1e-7).mean()
        expected_loss = F.cross_entropy(logits, LABELS) + 8.0 * score
    assert float(score) > 1e-3  # the perturbed prompts moved away from the hand-crafted ones
    vp.set_train_mode(model, True)
    loss = ClassificationObjective(3, None, adapted=model).loss(model, (IMAGES, LABELS))  # the trainer's loss
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-5, atol=1e-5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), logits, rtol=1e-5, atol=1e-5)


def test_kgcoop_starts_from_the_hand_crafted_prompt_and_the_term_is_zero():
    model = classifier("kgcoop")
    learner = prompt_learner(model)
    clip = tiny_clip_bpe()
    with torch.no_grad():
        words = clip.token_embedding(tokens_of(["a photo of a"]))[0, 1:5]
        torch.testing.assert_close(learner.context.ctx, words, rtol=0, atol=0)
        assert abs(float(learner.knowledge_score(learner.text_features()))) < 1e-6
    assert learner.config.weight == 8.0 and learner.config.n_ctx == 4


def test_prograd_initialisation_is_the_official_one():
    model = classifier("prograd", n_ctx=6)
    learner = prompt_learner(model)
    clip = tiny_clip_bpe()
    with torch.no_grad():
        expected = torch.zeros(6, 32)
        expected[2:] = clip.token_embedding(tokens_of(["a photo of a"]))[0, 1:5]
        torch.testing.assert_close(learner.context.ctx, expected, rtol=0, atol=0)
        reference, _ = prompt_embeddings(clip, expected, "X X a photo of a")
        torch.testing.assert_close(learner.prompts(learner.context.ctx), reference, rtol=0, atol=0)
    defaults = make_config("prograd")
    assert (defaults.n_ctx, defaults.ctx_init, defaults.lam, defaults.temperature) == (16, "a photo of a", 1.0, 1.0)


def official_prograd_gradient(ctx: torch.Tensor, labels: torch.Tensor, lam: float, temperature: float = 1.0):
    """The gradient ``prograd_backward_and_update`` leaves in ``ctx.grad`` and the two it starts from."""
    clip = tiny_clip_bpe()
    ctx = ctx.detach().clone().requires_grad_(True)
    student, _ = official_student_logits(clip, ctx, "X X a photo of a")
    with torch.no_grad():
        image = F.normalize(clip.encode_image(IMAGES), dim=-1)
        teacher = clip.logit_scale.exp() * image @ hand_crafted(clip, TEMPLATE).t()
    xe = F.cross_entropy(student, labels)
    kl = (-F.softmax(teacher / temperature, -1) * F.log_softmax(student / temperature, -1) * temperature**2).sum(1)
    (b,) = torch.autograd.grad(kl.mean(), ctx, retain_graph=True)
    (a,) = torch.autograd.grad(xe, ctx)
    b_hat, a_hat = b / torch.linalg.norm(b), a / torch.linalg.norm(a)
    if torch.dot(a_hat.flatten(), b_hat.flatten()) < 0:
        return a - lam * torch.dot(a.flatten(), b_hat.flatten()) * b_hat, a, b, kl.mean()
    return a, a, b, kl.mean()


@pytest.mark.parametrize(
    ("labels", "lam", "conflict"),
    [(LABELS, 1.0, True), (LABELS, 0.5, True), (None, 1.0, False)],
    ids=["conflict", "conflict-half", "aligned"],
)
def test_prograd_gradient_is_the_official_projection(labels, lam, conflict):
    model = perturb(classifier("prograd", n_ctx=6, lam=lam), std=0.5)
    learner = prompt_learner(model)
    if labels is None:  # the zero-shot CLIP's own predictions: the two gradients agree
        with torch.no_grad():
            clip = tiny_clip_bpe()
            image = F.normalize(clip.encode_image(IMAGES), dim=-1)
            labels = (image @ hand_crafted(clip, TEMPLATE).t()).argmax(1)
    expected, a, b, kd = official_prograd_gradient(learner.context.ctx, labels, lam)
    assert (torch.dot(a.flatten(), b.flatten()) < 0) == conflict  # the planted case is the one named
    vp.set_train_mode(model, True)
    objective = ClassificationObjective(3, None, adapted=model)
    objective.loss(model, (IMAGES, labels)).backward()
    torch.testing.assert_close(learner.context.ctx.grad, expected, rtol=1e-5, atol=1e-6)
    assert conflict == (not torch.allclose(learner.context.ctx.grad, a, rtol=1e-5, atol=1e-6))
    assert learner.diagnostics()["kd_loss"] == pytest.approx(float(kd.detach()), rel=1e-5)
    learner.context.ctx.grad = None  # the projection is spent: a second backward keeps its gradient
    model(IMAGES).sum().backward()
    assert learner.context.ctx.grad is not None


@pytest.mark.parametrize("method", ["kgcoop", "prograd"])
def test_short_training_lowers_the_loss(method):
    model = vp.attach(CLIPClassifier(tiny_clip_bpe(), TEN_NAMES), method, classnames=TEN_NAMES)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = objective_losses(model, steps=20, lr=3e-2)  # cross-entropy + the method's term, as the trainer's
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # towers untouched


@pytest.mark.slow
def test_save_load_in_a_new_process(tmp_path):
    trained = []
    for method in ("kgcoop", "prograd"):
        model = perturb(classifier(method)).eval()
        with torch.no_grad():
            trained.append(model(IMAGES))
        vp.save_adapter(model, tmp_path / method)
    reloaded = logits_in_new_process([(tmp_path / m, NAMES) for m in ("kgcoop", "prograd")], tmp_path)
    for got, expected in zip(reloaded, trained):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["kgcoop", "prograd", "coop"])
@pytest.mark.parametrize(
    ("factory", "options", "error", "words"),
    [
        (tiny_vit, {"classnames": NAMES}, IncompatibleMethodError, "text"),
        (tiny_clip_bpe, {"classnames": ("cat", "dog", "cat")}, ConfigError, "'cat' names both class 0 and class 2"),
        (tiny_clip_bpe, {"classnames": ("cat", " ", "dog")}, ConfigError, "class 1 has an empty name"),
    ],
    ids=["vision-only-model", "duplicate-name", "empty-name"],
)
def test_bad_input_is_one_line_and_changes_nothing(method, factory, options, error, words):
    model = factory()
    keys = set(model.state_dict())
    with pytest.raises(error) as err:
        vp.attach(model, method, **options)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert set(model.state_dict()) == keys and not vp.attached_methods(model)


@pytest.mark.parametrize(
    ("method", "options", "words"),
    [
        ("kgcoop", {"template": "a photo of a"}, "must hold exactly one '{}'"),
        ("prograd", {"template": "{} and {}"}, "must hold exactly one '{}'"),
        ("prograd", {"n_ctx": 3}, "has 4 words, more than n_ctx=3"),
        ("kgcoop", {"weight": -1.0}, "must be at least 0"),
    ],
)
def test_bad_options_are_one_line(method, options, words):
    model = tiny_clip_bpe()
    with pytest.raises(ConfigError) as err:
        vp.attach(model, method, classnames=NAMES, **options)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not vp.attached_methods(model)
