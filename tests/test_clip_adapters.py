"""CLIP-Adapter (Gao et al., IJCV 2023) and Tip-Adapter / Tip-Adapter-F (Zhang et al., ECCV 2022): the ViT-B/16
counts, logits equal to a test-side reference of the official equations, the official cache and search, the
classification trainer's cache / search steps, training, reload in a new process and one-line refusals.

Official code: gaopengcuhk/CLIP-Adapter (commit 08d07f8) ``clip_adapter.py``: ``Adapter`` lines 55-67 (Linear(c, c
// 4, no bias) - ReLU - Linear(c // 4, c, no bias) - ReLU), ``CustomCLIP.forward`` lines 100-115 (``ratio * x + (1 -
ratio) * image_features`` with ``ratio = 0.2``, both normalised, ``logit_scale.exp() * image @ text.t()``).
gaopengcuhk/Tip-Adapter (commit d0e2d6f) ``utils.py``: ``clip_classifier`` lines 18-35 (per class the normalised
template features averaged and normalised), ``build_cache_model`` lines 38-71 (``augment_epoch`` passes of the
training loader, features ``mean(dim=0)`` over the passes, normalised; one-hot values), ``search_hp`` lines 99-129
(the beta / alpha grids, beta outer, ``acc > best_acc`` from 0, accuracy ``cls_acc`` lines 10-15); ``main.py`` lines
39-42 and 91-94 (``100. * f @ clip_weights + ((-1) * (beta - beta * f @ cache_keys)).exp() @ cache_values * alpha``).
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from clip_fewshot_reference import (
    IMAGES,
    NAMES,
    TEN_NAMES,
    coloured_batch,
    hand_crafted,
    logits_in_new_process,
    objective_losses,
    official_text_features,
    perturb,
    tokens_of,
)
from tiny_models import tiny_clip_bpe, tiny_vit
from torch.utils.data import DataLoader, Dataset

import visionpeft as vp
from visionpeft.adapter import methods_of
from visionpeft.config import load_config
from visionpeft.data.fewshot import few_shot
from visionpeft.errors import ConfigError, DataError, IncompatibleMethodError
from visionpeft.methods.tip_adapter import search_beta_alpha
from visionpeft.tasks import CLIPClassifier
from visionpeft.trainers.classification import FEATURE_CACHE
from visionpeft.trainers.classification import run as train

TEMPLATE = "a photo of a {}."


class Augmented(Dataset):
    """Images with a random shift drawn from torch's generator per read (an augmentation), labels ``i % classes``."""

    def __init__(self, count: int, classes: int, seed: int = 11) -> None:
        self.images = torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        self.labels = [i % classes for i in range(count)]
        self.classes = [str(i) for i in range(classes)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index] + 0.3 * torch.randn(3, 32, 32), self.labels[index]


def method_of(model):
    return methods_of(model)[0]


def tip(name: str = "tip_adapter", names=NAMES, count: int = 9, **options):
    """A Tip-Adapter classifier with its cache built from ``Augmented(count)``."""
    model = vp.attach(CLIPClassifier(tiny_clip_bpe(), names), name, classnames=names, **options)
    method_of(model).fit_training_set(Augmented(count, len(names)), batch_size=4, seed=7)
    return model.eval()


def official_cache(dataset: Dataset, epochs: int, seed: int, num_classes: int):
    """``build_cache_model``: keys (d, N) and one-hot values (N, C) from ``epochs`` passes of a batch-4 loader."""
    clip = tiny_clip_bpe()
    torch.manual_seed(seed)
    keys, values = [], []
    with torch.no_grad():
        for epoch in range(epochs):
            features = []
            for images, target in DataLoader(dataset, batch_size=4, shuffle=False):
                features.append(clip.encode_image(images))
                if epoch == 0:
                    values.append(target)
            keys.append(torch.cat(features, dim=0).unsqueeze(0))
    keys = torch.cat(keys, dim=0).mean(dim=0)
    keys /= keys.norm(dim=-1, keepdim=True)
    return keys.permute(1, 0), F.one_hot(torch.cat(values, dim=0), num_classes).float()


def official_clip_weights(clip, templates, names=NAMES) -> torch.Tensor:
    """``clip_classifier``: (d, C)."""
    weights = []
    for name in names:
        tokens = tokens_of([t.format(name) for t in templates])
        embeddings = official_text_features(clip, clip.token_embedding(tokens), tokens)
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(dim=0)
        weights.append(mean / mean.norm())
    return torch.stack(weights, dim=1)


def official_tip_logits(features, clip_weights, keys, values, beta, alpha) -> torch.Tensor:
    clip_logits = 100.0 * features @ clip_weights
    cache_logits = ((-1) * (beta - beta * (features @ keys))).exp() @ values
    return clip_logits + cache_logits * alpha


def official_search(scale, step, keys, values, features, labels, clip_weights):
    """``search_hp`` with ``cls_acc``'s percentages."""
    beta_list = [i * (scale[0] - 0.1) / step[0] + 0.1 for i in range(step[0])]
    alpha_list = [i * (scale[1] - 0.1) / step[1] + 0.1 for i in range(step[1])]
    best_acc, best_beta, best_alpha = 0, 0, 0
    for beta in beta_list:
        for alpha in alpha_list:
            tip_logits = official_tip_logits(features, clip_weights, keys, values, beta, alpha)
            acc = 100 * float((tip_logits.argmax(1) == labels).float().sum()) / labels.shape[0]
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_beta, best_alpha


# -- counts ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [
        ("clip_adapter", {}, 2 * 512 * 128),
        ("tip_adapter", {"cache_size": 1600}, 0),
        ("tip_adapter_f", {"cache_size": 1600}, 1600 * 512),  # 16 shots x 100 classes, the keys train
    ],
)
def test_vitb16_counts(method, options, expected):
    with torch.device("meta"):
        model = open_clip.create_model("ViT-B-16", pretrained=None, device="meta")
    counts = vp.count_parameters(vp.attach(model, method, classnames=[f"class {i}" for i in range(100)], **options))
    assert counts["by_group"] == {method: expected} and counts["trainable"] == expected


# -- CLIP-Adapter ------------------------------------------------------------------------------------------------
def test_clip_adapter_logits_equal_the_official_equations():
    model = vp.attach(CLIPClassifier(tiny_clip_bpe(), NAMES), "clip_adapter", classnames=NAMES).eval()
    adapter = method_of(model).adapter
    clip = tiny_clip_bpe()
    with torch.no_grad():
        features = clip.visual(IMAGES)
        x = F.relu(F.relu(features @ adapter.fc[0].weight.t()) @ adapter.fc[2].weight.t())
        image = 0.2 * x + (1 - 0.2) * features
        image = image / image.norm(dim=-1, keepdim=True)
        expected = clip.logit_scale.exp() * image @ hand_crafted(clip, TEMPLATE).t()
        torch.testing.assert_close(model(IMAGES), expected, rtol=1e-5, atol=1e-5)
    assert adapter.fc[0].weight.shape == (4, 16) and adapter.fc[0].bias is None  # 16-d features, reduction 4


def test_clip_adapter_initialisation_is_pytorchs_default_linear():
    model = tiny_clip_bpe()
    torch.manual_seed(4)
    vp.attach(model, "clip_adapter", classnames=NAMES)
    torch.manual_seed(4)
    first, second = torch.nn.Linear(16, 4, bias=False), torch.nn.Linear(4, 16, bias=False)
    adapter = method_of(model).adapter
    torch.testing.assert_close(adapter.fc[0].weight, first.weight, rtol=0, atol=0)
    torch.testing.assert_close(adapter.fc[2].weight, second.weight, rtol=0, atol=0)


# -- Tip-Adapter -------------------------------------------------------------------------------------------------
def test_tip_adapter_cache_and_logits_equal_the_official_equations():
    model = tip(templates=(TEMPLATE, "a drawing of a {}."), augment_epochs=3, init_beta=2.0, init_alpha=1.5)
    cache = method_of(model).cache
    keys, values = official_cache(Augmented(9, 3), 3, seed=7, num_classes=3)
    torch.testing.assert_close(cache.keys, keys.t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.values, values, rtol=0, atol=0)
    clip = tiny_clip_bpe()
    with torch.no_grad():
        features = F.normalize(clip.encode_image(IMAGES), dim=-1)
        weights = official_clip_weights(clip, (TEMPLATE, "a drawing of a {}."))
        expected = official_tip_logits(features, weights, keys, values, 2.0, 1.5)
        torch.testing.assert_close(model(IMAGES), expected, rtol=1e-5, atol=1e-4)
    assert method_of(model).config.cache_size == 9


def test_the_search_picks_the_official_grid_point_on_a_planted_case():
    """One validation image of class 0: zero-shot logits favour class 1 by 2, its key matches class 0's exactly
    (affinity 1) and class 1's not at all (affinity 0), so it is right iff ``alpha * (1 - exp(-beta)) > 2``: on the
    official ImageNet grid (scales 7 / 3, 200 / 20 steps) first at beta index 33 (1.2385; index 32, 1.2040, misses
    by 0.0015) with the largest alpha (2.855)."""
    clip_logits, affinity = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    beta, alpha, correct = search_beta_alpha(clip_logits, affinity, torch.eye(2), torch.tensor([0]), (7, 3), (200, 20))
    assert (beta, alpha, correct) == (33 * 6.9 / 200 + 0.1, 19 * 2.9 / 20 + 0.1, 1)
    assert search_beta_alpha(clip_logits, affinity, torch.eye(2), torch.tensor([1]), (7, 3), (2, 2))[:2] == (0.1, 0.1)
    nothing = search_beta_alpha(torch.tensor([[0.0, 99.0]]), affinity, torch.eye(2), torch.tensor([0]), (7, 3), (4, 4))
    assert nothing == (0.0, 0.0, 0)  # the official search's start when no point is right


@pytest.mark.parametrize("name", ["tip_adapter", "tip_adapter_f"])
def test_select_on_validation_is_the_official_search(name):
    model = tip(name, search_scale=(7.0, 3.0), search_step=(30, 10))
    method = method_of(model)
    if name == "tip_adapter_f":
        perturb(model, std=0.2)  # fine-tuned keys: the search uses them as they are
    labels = torch.tensor([0, 1, 2, 0])
    chosen = method.select_on_validation([(IMAGES[:2], labels[:2]), (IMAGES[2:], labels[2:])])
    clip = tiny_clip_bpe()
    with torch.no_grad():
        features = F.normalize(clip.encode_image(IMAGES), dim=-1)
        weights = official_clip_weights(clip, (TEMPLATE,))
        keys, values = method.cache.keys.detach().t(), method.cache.values
        expected = official_search((7.0, 3.0), (30, 10), keys, values, features, labels, weights)
    assert (chosen["beta"], chosen["alpha"]) == expected
    assert (float(method.cache.beta), float(method.cache.alpha)) == pytest.approx(expected, rel=1e-6)


def test_the_cache_is_built_once_on_disk_and_leaves_the_random_state_alone(tmp_path, monkeypatch):
    model = vp.attach(CLIPClassifier(tiny_clip_bpe(), NAMES), "tip_adapter", classnames=NAMES, augment_epochs=2)
    method, data = method_of(model), Augmented(6, 3)
    fields = {"base_weights_sha256": "0" * 64, "data": {"name": "augmented"}}
    torch.manual_seed(0)
    first = method.fit_training_set(data, batch_size=4, seed=7, cache_root=tmp_path, cache_fields=fields)
    after_building = torch.rand(3)
    keys, labels = method.cache.keys.clone(), method.cache.values.argmax(1)
    calls = []
    monkeypatch.setattr(method, "cache_features", lambda *a: calls.append(1) or {"keys": keys, "labels": labels})
    torch.manual_seed(0)
    second = method.fit_training_set(data, batch_size=4, seed=7, cache_root=tmp_path, cache_fields=fields)
    assert first == second and list(tmp_path.iterdir()) == [first] and calls == []  # read, not computed
    torch.testing.assert_close(torch.rand(3), after_building, rtol=0, atol=0)  # same random state either way
    torch.testing.assert_close(method.cache.keys, keys, rtol=0, atol=0)
    other = {**fields, "data": {"name": "other"}}  # other data: computed again, into a file of its own
    third = method.fit_training_set(data, batch_size=4, seed=7, cache_root=tmp_path, cache_fields=other)
    assert calls == [1] and third != first and sorted(tmp_path.iterdir()) == sorted([first, third])


@pytest.mark.parametrize("name", ["clip_adapter", "tip_adapter_f"])
def test_short_training_lowers_the_loss(name):
    if name == "clip_adapter":
        model = vp.attach(CLIPClassifier(tiny_clip_bpe(), TEN_NAMES), name, classnames=TEN_NAMES)
    else:
        model = tip(name, names=TEN_NAMES, count=20, init_alpha=0.5)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = objective_losses(model, steps=30, lr=1e-2, batch=coloured_batch())
    assert losses[-1] < 0.95 * losses[0]  # CLIP-Adapter moves 20 % of a feature, scored at the tiny CLIP's scale 14
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # CLIP untouched


@pytest.mark.slow
def test_save_load_in_a_new_process(tmp_path):
    models = {
        "clip_adapter": perturb(vp.attach(CLIPClassifier(tiny_clip_bpe(), NAMES), "clip_adapter", classnames=NAMES)),
        "tip_adapter": tip(init_beta=3.0),
        "tip_adapter_f": perturb(tip("tip_adapter_f")),
    }
    trained = []
    for name, model in models.items():
        with torch.no_grad():
            trained.append(model.eval()(IMAGES))
        vp.save_adapter(model, tmp_path / name)
    reloaded = logits_in_new_process([(tmp_path / name, NAMES) for name in models], tmp_path)
    for got, expected in zip(reloaded, trained):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# -- the classification trainer: cache before training, search after it ------------------------------------------
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip_weights(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip")
    (tmp / "tiny-clip-adapters.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp / "tiny-clip-adapters.json")
    torch.manual_seed(0)
    weights = tmp / "tiny_clip.pt"
    torch.save(open_clip.create_model("tiny-clip-adapters").state_dict(), weights)
    return weights


def tip_config(tmp_path: Path, weights: Path, *overrides: str):
    path = tmp_path / "tip.yaml"
    path.write_text(f"""
model: {{library: open_clip, name: tiny-clip-adapters, checkpoint: {weights}, clip_head: prompts}}
method: {{name: tip_adapter_f, augment_epochs: 2, search_step: [40, 10]}}
data: {{name: digits, img_size: 32, batch_size: 8, num_workers: 0, shots: 2, val_split: val, augment: crop_flip}}
optim: {{name: adamw, lr: 0.001, epochs: 2, warmup_epochs: 0, weight_decay: 0.0}}
train: {{output_dir: {tmp_path / "runs"}}}
""")
    return load_config(path, list(overrides))


@pytest.mark.slow
def test_a_tip_adapter_f_run_caches_trains_searches_and_reuses_the_cache(tmp_path, tiny_clip_weights):
    results = []
    for name in ("first", "second"):
        config = tip_config(tmp_path, tiny_clip_weights, f"train.run_name={name}")
        results.append(train(config, tmp_path / "runs" / name, cpu=True))
    cached = list((tmp_path / "runs" / FEATURE_CACHE).iterdir())
    assert len(cached) == 1  # built by the first run, read by the second
    first, second = results
    assert first["parameters"]["by_group"] == {"tip_adapter_f": 20 * 16}  # 2 shots x 10 digits, 16-d keys
    chosen = first["selected"]["tip_adapter_f"]
    assert chosen["beta"] in [i * 6.9 / 40 + 0.1 for i in range(40)]
    assert chosen["alpha"] in [i * 2.9 / 10 + 0.1 for i in range(10)]
    assert second["selected"] == first["selected"] and second["test"] == first["test"]  # seeded: the same run
    best = vp.load_adapter(
        CLIPClassifier(open_clip.create_model("tiny-clip-adapters"), [str(i) for i in range(10)]),
        tmp_path / "runs" / "first" / "best",
        check_base=False,
    )
    assert float(method_of(best).cache.beta) == pytest.approx(chosen["beta"])  # the searched values are saved


def test_a_training_run_refuses_training_free_tip_adapter(tmp_path, tiny_clip_weights):
    with pytest.raises(ConfigError) as err:
        tip_config(tmp_path, tiny_clip_weights, "method=tip_adapter")
    assert "tip_adapter is training-free" in str(err.value) and "train tip_adapter_f" in str(err.value)
    assert "tools/eval_zeroshot.py --model ... --dataset ... --tip-adapter --shots N" in str(err.value)
    assert "\n" not in str(err.value)


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["clip_adapter", "tip_adapter", "tip_adapter_f"])
@pytest.mark.parametrize(
    ("factory", "options", "error", "words"),
    [
        (tiny_vit, {"classnames": NAMES}, IncompatibleMethodError, "needs an open_clip model's text tower"),
        (tiny_clip_bpe, {"classnames": ("cat", "dog", "cat")}, ConfigError, "'cat' names both class 0 and class 2"),
        (tiny_clip_bpe, {"classnames": ("cat", "", "dog")}, ConfigError, "class 1 has an empty name"),
        (tiny_clip_bpe, {"classnames": NAMES, "tower": "text"}, ConfigError, "set tower=vision"),
    ],
    ids=["vision-only-model", "duplicate-name", "empty-name", "text-tower"],
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
        ("clip_adapter", {"template": "a photo"}, "must hold exactly one '{}'"),
        ("clip_adapter", {"reduction": 32}, "leaves no hidden unit"),
        ("tip_adapter", {"templates": ("a {}", "no slot")}, "must hold exactly one '{}'"),
        ("tip_adapter", {"search_scale": (7.0,)}, "search_scale must be two numbers"),
        ("tip_adapter_f", {"search_step": (200, 0)}, "search_step must be two numbers (beta, alpha) of at least 1"),
    ],
)
def test_bad_options_are_one_line(method, options, words):
    with pytest.raises(ConfigError) as err:
        vp.attach(tiny_clip_bpe(), method, classnames=NAMES, **options)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_an_empty_cache_and_a_shot_count_beyond_a_class_are_one_line():
    model = vp.attach(CLIPClassifier(tiny_clip_bpe(), NAMES), "tip_adapter", classnames=NAMES).eval()
    with pytest.raises(ConfigError, match="cache is empty: build it from the few-shot training set first"):
        model(IMAGES)
    with pytest.raises(DataError) as err:  # the few-shot sampler names the class
        few_shot(Augmented(7, 3), shots=3)
    assert str(err.value) == "class '1' has 2 items, fewer than the 3 shots asked for"
