"""Visual prompting (Bahng et al. 2022): the pad count at 224 px, the official prompters' equations on ViT, EVA, a CNN
and CLIP, the official initialisation, the image size and its one-line refusals, composition, save / load, training
and bad options.

The references below are this test's own code for hjbahng/visual_prompting ``models/prompters.py`` (commit
679e71f): ``PadPrompter`` (lines 6-24: ``pad_up`` / ``pad_down`` of (1, 3, p, size), ``pad_left`` / ``pad_right`` of
(1, 3, size - 2p, p), a zero base inside, ``x + prompt``), ``FixedPatchPrompter`` (lines 27-38: a (1, 3, p, p) patch
at the top-left corner) and ``RandomPatchPrompter`` (lines 41-55: the patch at rows / columns ``np.random.choice(size -
p)``, drawn at every call); every parameter starts as ``torch.randn``; the prompter runs on the preprocessed
(resized, normalised) batch before the frozen model (``main_clip.py`` lines 259-262).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from tiny_models import CASES, tiny_clip, tiny_vit, training_losses

import visionpeft as vp
from visionpeft.adapter import methods_of
from visionpeft.errors import ConfigError, DataError, IncompatibleMethodError

ROOT = Path(__file__).resolve().parents[1]


def images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prompt_tensors(model):
    return dict(next(m for m in methods_of(model) if m.name == "vp").named_tensors())


def test_pad_count_at_224_is_the_official_one():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    counts = vp.count_parameters(vp.attach(model, "vp"))
    assert counts["by_group"]["vp"] == 2 * 3 * 30 * 224 + 2 * 3 * (224 - 60) * 30 == 69_840
    with torch.device("meta"):
        patch = vp.attach(timm.create_model("vit_base_patch16_224", pretrained=False), "vp", style="fixed_patch")
    assert vp.count_parameters(patch)["by_group"]["vp"] == 3 * 30 * 30 == 2_700


def official_pad(params, x):
    """``PadPrompter.forward`` (lines 18-24): [left | zeros | right] between up and down, added to the batch."""
    left, right = params["vp.pad_left"], params["vp.pad_right"]
    base = torch.zeros(1, 3, left.shape[2], x.shape[3] - 2 * left.shape[3])
    prompt = torch.cat([left, base, right], dim=3)
    prompt = torch.cat([params["vp.pad_up"], prompt, params["vp.pad_down"]], dim=2)
    return x + torch.cat(x.size(0) * [prompt])


def official_fixed_patch(params, x):
    """``FixedPatchPrompter.forward`` (lines 34-38)."""
    patch = params["vp.patch"]
    prompt = torch.zeros(1, 3, x.shape[2], x.shape[3])
    prompt[:, :, : patch.shape[2], : patch.shape[3]] = patch
    return x + prompt


def resnet():
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, zero_init_last=False).eval()


def eva():
    from timm.models.eva import Eva

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, use_rot_pos_emb=True)
    return Eva(**kw, ref_feat_shape=(4, 4)).eval()


def clip_classifier():
    from tiny_models import tiny_clip_bpe

    from visionpeft.tasks import CLIPClassifier

    return CLIPClassifier(tiny_clip_bpe(), ["tabby cat", "fire truck", "golden retriever"]).eval()


MODELS = {
    "vit": (tiny_vit, {}, 32),
    "vit_reg_avg": (CASES["vit_reg_avg"].factory, {}, 32),
    "eva": (eva, {}, 32),
    "resnet-generic": (resnet, {"image_size": 32}, 32),
    "clip_vision": (tiny_clip, {}, 32),  # open_clip's own visual tower (nn.MultiheadAttention)
    "clip_vision_lnd": (lambda: tiny_clip(batch_first=False), {}, 32),
    "clip-zero-shot-classifier": (clip_classifier, {}, 32),  # the paper's case: CLIP frozen, class-name prompts
}


def run(model, x):
    """An open_clip model's image features, any other model's output."""
    return model.encode_image(x) if hasattr(model, "encode_image") else model(x)


@pytest.mark.parametrize(("style", "reference"), [("padding", official_pad), ("fixed_patch", official_fixed_patch)])
@pytest.mark.parametrize("case", list(MODELS))
def test_forward_equals_the_frozen_model_on_the_officially_prompted_images(case, style, reference):
    factory, options, size = MODELS[case]
    plain, model = factory(), vp.attach(factory(), "vp", style=style, prompt_size=5, **options)
    params, x = prompt_tensors(model), images(size=size)
    with torch.no_grad():
        torch.testing.assert_close(run(model, x), run(plain, reference(params, x)), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(run(model, x), run(plain, x), rtol=1e-2, atol=0)  # the prompt really acts
    vp.set_train_mode(model, True)
    run(model, x).square().mean().backward()
    assert all(p.grad is not None for _, p in vp.trainable_parameters(model))
    assert all(p.grad.abs().sum() > 0 for p in params.values())
    vp.detach(model.eval())
    with torch.no_grad():
        torch.testing.assert_close(run(model, x), run(plain, x), rtol=0, atol=0)


def test_random_patch_lands_anywhere_inside_the_image_at_every_call():
    """``RandomPatchPrompter`` (lines 48-55): one position per call, rows and columns in [0, size - p), the rest of
    the image untouched; torch's generator draws it, so a seeded run repeats it."""
    captured = []
    model = vp.attach(tiny_vit(), "vp", style="random_patch", prompt_size=5)
    model.patch_embed.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    patch = prompt_tensors(model)["vp.patch"].detach()
    corners = set()
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        for seed in range(40):
            torch.manual_seed(seed)
            model(x)
            added = captured[-1][0, 0]
            rows, cols = added.nonzero(as_tuple=True)
            top, left = int(rows.min()), int(cols.min())
            assert 0 <= top < 32 - 5 and 0 <= left < 32 - 5
            torch.testing.assert_close(captured[-1][:, :, top : top + 5, left : left + 5], patch)
            torch.testing.assert_close(added.abs().sum(), patch[0, 0].abs().sum())  # nothing outside the window
            corners.add((top, left))
        torch.manual_seed(7)
        first = model(images())
        torch.manual_seed(7)
        torch.testing.assert_close(model(images()), first, rtol=0, atol=0)
    assert len(corners) > 20


def test_initialisation_is_the_official_standard_normal():
    model = vp.attach(tiny_vit(img_size=224, patch_size=32), "vp")
    values = torch.cat([p.detach().flatten() for p in prompt_tensors(model).values()])
    assert values.numel() == 69_840
    assert abs(values.mean()) < 0.02 and abs(values.std() - 1) < 0.02


def test_image_size_comes_from_the_model_and_each_refusal_is_one_line():
    with pytest.raises(ConfigError) as err:
        vp.attach(resnet(), "vp")
    assert str(err.value) == "vp needs the image size of a model that takes any size: set its option image_size"
    cases = [
        (
            tiny_vit(),
            {},
            ConfigError,
            "vp's pad of prompt_size 30 on each side leaves nothing of 32x32 images; 2 x prompt_size must be below 32",
        ),
        (
            tiny_vit(),
            {"prompt_size": 16},
            ConfigError,
            "vp's pad of prompt_size 16 on each side leaves nothing of 32x32 images; 2 x prompt_size must be below 32",
        ),
        (
            tiny_vit(),
            {"style": "random_patch", "prompt_size": 32},
            ConfigError,
            "vp's random_patch of prompt_size 32 does not fit in 32x32 images; prompt_size must be below 32",
        ),
        (
            tiny_vit(),
            {"image_size": 48, "prompt_size": 4},
            ConfigError,
            "vp image_size=48, but the model takes only 32x32 images; leave image_size out",
        ),
    ]
    for model, options, kind, message in cases:
        with pytest.raises(kind) as err:
            vp.attach(model, "vp", **options)
        assert str(err.value) == message
        assert not vp.attached_methods(model)
    model = vp.attach(resnet(), "vp", prompt_size=4, image_size=32)
    with pytest.raises(DataError) as err:
        model(images(size=48))
    assert (
        str(err.value) == "vp's prompt is learned for 3x32x32 images (channels x height x width); the model got 3x48x48"
    )
    with pytest.raises(DataError, match="the model got no image tensor$"):
        model(x=images())  # a keyword input: nothing positional to prompt


@pytest.mark.parametrize(
    ("factory", "options", "words"),
    [
        (lambda: tiny_clip(), {"tower": "text", "prompt_size": 4}, "the open_clip 'text' tower reads no images"),
        (lambda: CASES["dit"].factory(), {"prompt_size": 2, "image_size": 8}, "'dit' tower reads no images"),
        (lambda: CASES["unet"].factory(), {"prompt_size": 2, "image_size": 8}, "'unet' tower reads no images"),
    ],
    ids=["clip-text", "dit", "unet"],
)
def test_a_tower_without_images_is_one_line(factory, options, words):
    model = factory()
    keys = set(model.state_dict())
    with pytest.raises(IncompatibleMethodError) as err:
        vp.attach(model, "vp", **options)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert set(model.state_dict()) == keys and not vp.attached_methods(model)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompt_size": 0}, "method 'vp' option 'prompt_size' must be at least 1, got 0"),
        ({"style": "pad"}, "method 'vp' option 'style' must be one of padding, fixed_patch, random_patch, got 'pad'"),
        ({"image_size": 0}, "method 'vp' option 'image_size' must be at least 1, got 0"),
    ],
)
def test_bad_options_are_one_line(options, message):
    model = tiny_vit()
    with pytest.raises(ConfigError) as err:
        vp.attach(model, "vp", **options)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not vp.attached_methods(model)


@pytest.mark.parametrize("order", [0, 1], ids=["vp-first", "vp-last"])
def test_composes_with_lora_and_merges_nothing(order):
    """vp changes only the images; LoRA inside the model sees the prompted ones. Neither order merges vp."""
    methods = [("vp", {"prompt_size": 4}), ("lora", {"r": 2})]
    model = vp.attach(tiny_vit(), methods if order == 0 else methods[::-1])
    lora_alone = vp.attach(tiny_vit(), "lora", r=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        trained = dict(next(m for m in methods_of(model) if m.name == "lora").named_tensors())
        for name, tensor in methods_of(lora_alone)[0].named_tensors():
            tensor.copy_(trained[name].add_(0.1 * torch.randn(trained[name].shape, generator=g)))
        expected = lora_alone(official_pad(prompt_tensors(model), images()))
        torch.testing.assert_close(model(images()), expected, rtol=1e-5, atol=1e-5)
    assert not vp.can_merge(model)
    with pytest.raises(IncompatibleMethodError):
        vp.merge(model)


def test_save_load_round_trip_and_detach(tmp_path):
    model = vp.attach(tiny_vit(), "vp", prompt_size=4)
    with torch.no_grad():
        trained = model(images())
    vp.save_adapter(model, tmp_path)
    fresh = vp.load_adapter(tiny_vit(), tmp_path)
    assert vp.attached_methods(fresh)[0][1].prompt_size == 4
    with torch.no_grad():
        torch.testing.assert_close(fresh(images()), trained, rtol=0, atol=0)
    original = copy.deepcopy(tiny_vit())
    vp.detach(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images()), original(images()), rtol=0, atol=0)


RELOAD = """
import sys, torch, visionpeft as vp
sys.path.insert(0, {tests!r})
from test_visual_prompting import clip_classifier, images
torch.manual_seed(123)  # nothing trained may come from the fresh model's own draws
model = vp.load_adapter(clip_classifier(), {adapter!r})
torch.save(model(images()), {out!r})
"""


@pytest.mark.slow
def test_clip_classifier_saves_only_the_pad_and_loads_in_a_new_process(tmp_path):
    model = vp.attach(clip_classifier(), "vp", prompt_size=4)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.mul_(0.5)
        expected = model(images())
    vp.save_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "visionpeft_adapter.safetensors")
    assert sum(t.numel() for t in saved.values()) == vp.count_parameters(model)["trainable"] == 1_344
    script = RELOAD.format(tests=str(ROOT / "tests"), adapter=str(tmp_path / "adapter"), out=str(tmp_path / "out.pt"))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    # the child runs with torch's default thread count, the test worker with one: reductions may differ by ~1e-7
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-5, atol=1e-6)


def test_short_training_lowers_the_loss():
    model = vp.attach(tiny_vit(), "vp", prompt_size=8)
    losses = training_losses(model, steps=30, lr=3e-2)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.slow
def test_tools_train_runs_vp_on_the_demo(tmp_path):
    from _demo_utils import CHECKPOINT, MAIN_CONFIG

    args = [
        sys.executable,
        str(ROOT / "tools" / "train.py"),
        str(MAIN_CONFIG),
        "method={name: vp, prompt_size: 4}",
        "optim.epochs=1",
        f"model.checkpoint={CHECKPOINT}",
        f"train.output_dir={tmp_path}",
        "train.run_name=vp",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    last = (tmp_path / "vp" / "metrics.jsonl").read_text().strip().splitlines()[-1]
    assert '"test/top1"' in last and float(last.split('"test/top1": ')[1].split(",")[0]) > 0.2  # chance: 0.1
