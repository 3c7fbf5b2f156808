"""VQT (Tu et al. 2023): the ViT-B/16 count, the official equations (the head on the concatenation), queries hidden
from the other tokens on every token tower, composition, the official initialisation, save / load, training, bad
options and models it does not fit.

The reference below is this test's own code for the equations of andytu28/VQT
``src/models/vit_backbones/h2t_vit.py`` (commit 9bca87e): ``Head2ToeEncoder.forward`` (lines 283-304: a block's
queries ``query_prompt_embeddings[l]`` put before its input, its query outputs collected and dropped after it, the
final norm on the rest), ``Head2ToeBlock.forward`` (lines 201-211: pre-norm attention and MLP residuals),
``Head2ToeAttention.forward`` (lines 95-117: queries from every token, keys and values from the tokens after the
queries only), ``Head2ToeVisionTransformer.forward`` (lines 354-388, concat mode: ``[x[:, 0]; q_1.view(B, -1); ...]``,
each part L2-normalised with ``NORMALIZE_FEATS``, one Linear head over the concatenation); the initialisation of the
queries (lines 264-269, xavier-uniform bound) and of the head (``src/models/mlp.py`` lines 52-53, kaiming normal,
fan_out).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from tiny_models import CASES, tiny_clip, tiny_clip_timm, tiny_vit, training_losses

import visionpeft as vp
from visionpeft.adapter import methods_of
from visionpeft.errors import ConfigError, IncompatibleMethodError

ROOT = Path(__file__).resolve().parents[1]
D, DEPTH = 768, 12


def images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def vqt_of(model):
    return next(m for m in methods_of(model) if m.name == "vqt")


def test_vitb16_count():
    """One query per block: 12 x 768 = 9,216 query parameters, plus the query part of the classifier (12 x 768 x C;
    the official head is one Linear over 768 + 9,216 features)."""
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    counts = vp.count_parameters(vp.attach(model, "vqt"))
    queries = sum(p.numel() for name, p in vqt_of(model).named_tensors() if name.endswith(".vqt.prompt"))
    assert queries == DEPTH * 1 * D == 9_216
    assert counts["by_group"]["vqt"] == 9_216 + 9_216 * 100 == 930_816
    assert counts["by_group"]["head"] == D * 100 + 100
    with torch.device("meta"):
        ten = vp.attach(
            timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100), "vqt", num_tokens=10
        )
    assert vp.count_parameters(ten)["by_group"]["vqt"] == 92_160 + 92_160 * 100


def layer_norm(x, norm):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def official_logits(model, queries, query_head, x_images, normalize, block_outputs):
    """The official VQT forward on the timm model's frozen weights (functional calls only, so no hook runs); appends
    each block's output without its queries to ``block_outputs``."""
    conv = model.patch_embed.proj
    x = F.conv2d(x_images, conv.weight, conv.bias, stride=conv.stride).flatten(2).transpose(1, 2)
    b = x.shape[0]
    x = torch.cat([model.cls_token.expand(b, -1, -1), x], dim=1) + model.pos_embed
    query_outputs = []
    for blk, prompt in zip(model.blocks, queries):
        nq = prompt.shape[0]
        h = torch.cat([prompt.expand(b, -1, -1), x], dim=1)  # lines 289-292: queries first
        a = layer_norm(h, blk.norm1)
        w, bias, d = blk.attn.qkv.weight, blk.attn.qkv.bias, blk.attn.qkv.in_features
        heads = blk.attn.num_heads

        def split(t, heads=heads):
            return t.reshape(b, t.shape[1], heads, -1).transpose(1, 2)

        q = split(F.linear(a, w[:d], bias[:d]))  # every token asks (line 97)
        k = split(F.linear(a[:, nq:], w[d : 2 * d], bias[d : 2 * d]))  # keys / values: the others only (96-99)
        v = split(F.linear(a[:, nq:], w[2 * d :], bias[2 * d :]))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).softmax(dim=-1)
        context = (probs @ v).transpose(1, 2).reshape(b, -1, d)
        h = h + F.linear(context, blk.attn.proj.weight, blk.attn.proj.bias)
        mlp = blk.mlp
        h = h + F.linear(
            F.gelu(F.linear(layer_norm(h, blk.norm2), mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias
        )
        query_outputs.append(h[:, :nq])  # lines 299-301
        x = h[:, nq:]
        block_outputs.append(x)
    encoded = layer_norm(x, model.norm)  # line 303
    features = [encoded[:, 0]] + [q.reshape(b, -1) for q in query_outputs]  # lines 372-380
    if normalize:
        features = [F.normalize(f) for f in features]  # lines 381-382
    weight = torch.cat([model.head.weight, query_head], dim=1)  # ONE linear head over the concatenation (line 386)
    return F.linear(torch.cat(features, dim=1), weight, model.head.bias)


@pytest.mark.parametrize(("num_tokens", "normalize"), [(1, True), (3, True), (2, False)])
def test_forward_equals_the_official_equations_with_one_head_over_the_concatenation(num_tokens, normalize):
    """Our logits are the task head on the class-token feature plus VQT's own map on the query outputs; the reference
    is one Linear over the concatenation whose weight is the two side by side: the sum of linear maps on the parts
    equals the linear map on the concatenation. Every block's output (queries dropped) agrees too."""
    model = vp.attach(tiny_vit(depth=3), "vqt", num_tokens=num_tokens, normalize=normalize)
    tensors = dict(vqt_of(model).named_tensors())
    queries = [tensors[f"blocks.{i}.vqt.prompt"] for i in range(3)]
    ours: list[torch.Tensor] = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda m, a, out: ours.append(out))
    reference: list[torch.Tensor] = []
    with torch.no_grad():
        logits = model(images())
        expected = official_logits(model, queries, tensors["vqt.head.weight"], images(), normalize, reference)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        for got, want in zip(ours, reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        cls = model.forward_features(images())[:, 0]
        head_only = F.linear(F.normalize(cls) if normalize else cls, model.head.weight, model.head.bias)
    assert (logits - head_only).abs().max() > 1e-3  # the query part really contributes


def probe(clip):
    """A task model reading CLIP's image features with a linear head (the task-model protocol)."""

    class ClipProbe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip, self.head = clip, torch.nn.Linear(16, 10)

        def inner_model(self):
            return self.clip

        def task_heads(self):
            return {"head": self.head}

        def forward(self, x):
            return self.head(self.clip.encode_image(x))

    torch.manual_seed(0)
    return ClipProbe().eval()


def eva(**overrides):
    from timm.models.eva import Eva

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, qkv_bias=True)
    return Eva(**{**kw, "use_rot_pos_emb": True, "ref_feat_shape": (4, 4), **overrides}).eval()


TOWERS = {
    "vit": (tiny_vit, lambda m: m.forward_features, 32),
    "vit_reg_avg": (CASES["vit_reg_avg"].factory, lambda m: m.forward_features, 32),
    "vit_nocls": (CASES["vit_nocls"].factory, lambda m: m.forward_features, 32),
    "eva_rope": (eva, lambda m: m.forward_features, 32),
    "clip_vision": (lambda: probe(tiny_clip()), lambda m: m.clip.encode_image, 32),
    "clip_vision_lnd": (lambda: probe(tiny_clip(batch_first=False)), lambda m: m.clip.encode_image, 32),
    "clip_timm": (lambda: probe(tiny_clip_timm()), lambda m: m.clip.encode_image, 224),
    "clip_classifier_head": (lambda: clip_classifier(), lambda m: m.clip.encode_image, 32),
}


def clip_classifier():
    """The classification task's CLIP classifier with its text-initialised linear head."""
    from tiny_models import tiny_clip_bpe

    from visionpeft.tasks import CLIPClassifier

    return CLIPClassifier(tiny_clip_bpe(), ["tabby cat", "fire truck", "golden retriever"], head=True).eval()


@pytest.mark.parametrize("tower", list(TOWERS))
def test_the_other_tokens_never_see_the_queries_and_everything_trains(tower):
    """On every token tower the features the head reads are the frozen model's (the queries are no keys or values;
    EVA's rotary embedding and open_clip's sequence-first layout included); the queries and VQT's map get gradients,
    and detach restores the model."""
    factory, features, size = TOWERS[tower]
    plain, model = factory(), vp.attach(factory(), "vqt", num_tokens=2)
    x = images(size=size)
    with torch.no_grad():
        torch.testing.assert_close(features(model)(x), features(plain)(x), rtol=1e-5, atol=1e-5)
        before = plain(x)
    vp.set_train_mode(model, True)
    model(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in vp.trainable_parameters(model))
    model.eval()
    layout = vqt_of(model).tower.tokens
    vp.detach(model)
    assert layout.extra_prefix == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


OTHERS = {
    "vpt-deep": ("vpt", {"num_tokens": 2, "deep": True}),
    "convpass": ("convpass", {}),
    "lora": ("lora", {"r": 2}),
    "adaptformer": ("adaptformer", {"bottleneck": 4}),
}


@pytest.mark.parametrize("first", [True, False], ids=["vqt-first", "vqt-last"])
@pytest.mark.parametrize("other", list(OTHERS))
def test_composes_with_other_methods_in_either_order(other, first):
    """With another method in the same model, the tokens the head reads are exactly that method's alone (the same
    trained tensors): VPT's prompts, Convpass' patch grid and LoRA's layers never meet the queries."""
    name, options = OTHERS[other]
    methods = [("vqt", {}), (name, options)] if first else [(name, options), ("vqt", {})]
    model = vp.attach(tiny_vit(), methods)
    alone = vp.attach(tiny_vit(), name, **options)
    g = torch.Generator().manual_seed(0)
    trained = dict(next(m for m in methods_of(model) if m.name == name).named_tensors())
    with torch.no_grad():
        for key, tensor in methods_of(alone)[0].named_tensors():
            tensor.copy_(trained[key].add_(0.1 * torch.randn(trained[key].shape, generator=g)))
        torch.testing.assert_close(
            model.forward_features(images()), alone.forward_features(images()), rtol=1e-5, atol=1e-5
        )
    assert model(images()).shape == (2, 10)


def test_under_autocast_the_mask_comes_in_the_dtype_of_the_scores():
    """The layer norm before the attention gives float32 under autocast while the scores are bf16: the mask is made
    in the autocast dtype, which CUDA's fused attention kernels ask of a float mask."""
    model, plain = vp.attach(tiny_vit(), "vqt"), tiny_vit()
    seen = []
    model.blocks[0].attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["attn_mask"].dtype), with_kwargs=True
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model.forward_features(images()), plain.forward_features(images())
    assert seen == [torch.bfloat16]
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)  # bf16: the frozen tokens still ignore the queries
    with torch.no_grad():
        model(images())
    assert seen[-1] == torch.float32


def test_initialisation_is_the_official_one():
    model = vp.attach(tiny_vit(), "vqt", num_tokens=60)  # 2 x 60 x 32 values per draw
    tensors = dict(vqt_of(model).named_tensors())
    queries = torch.cat([tensors[f"blocks.{i}.vqt.prompt"].flatten() for i in range(2)]).detach()
    bound = math.sqrt(6.0 / (3 * 8 * 8 + 32))  # val = sqrt(6 / (3 * patch * patch + dim)), lines 268-269
    assert queries.abs().max() <= bound and abs(queries.std() - bound / math.sqrt(3)) < 0.05 * bound
    head = tensors["vqt.head.weight"].detach()  # kaiming_normal_(a=0, mode="fan_out"): std sqrt(2 / classes)
    assert head.shape == (10, 2 * 60 * 32) and abs(head.std() - math.sqrt(2 / 10)) < 0.03 * math.sqrt(2 / 10)


def test_save_load_round_trip_and_detach(tmp_path):
    model = vp.attach(tiny_vit(), "vqt", num_tokens=2)
    with torch.no_grad():
        trained = model(images())
    vp.save_adapter(model, tmp_path)
    fresh = vp.load_adapter(tiny_vit(), tmp_path)
    assert vp.attached_methods(fresh)[0][1].num_tokens == 2
    with torch.no_grad():
        torch.testing.assert_close(fresh(images()), trained, rtol=0, atol=0)
    assert not vp.can_merge(model)
    with pytest.raises(IncompatibleMethodError, match="vqt cannot be merged"):
        vp.merge(model)
    vp.detach(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images()), tiny_vit()(images()), rtol=0, atol=0)


RELOAD = """
import sys, torch, visionpeft as vp
sys.path.insert(0, {tests!r})
from tiny_models import tiny_vit
torch.manual_seed(123)  # nothing trained may come from the fresh model's own draws
model = vp.load_adapter(tiny_vit(), {adapter!r})
torch.save(model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))), {out!r})
"""


@pytest.mark.slow
def test_vqt_with_lora_saves_only_what_it_trains_and_loads_in_a_new_process(tmp_path):
    model = vp.attach(tiny_vit(), [("vqt", {"num_tokens": 2}), ("lora", {"r": 2})])
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
        expected = model(images())
    vp.save_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "visionpeft_adapter.safetensors")
    assert sum(t.numel() for t in saved.values()) == vp.count_parameters(model)["trainable"]
    script = RELOAD.format(tests=str(ROOT / "tests"), adapter=str(tmp_path / "adapter"), out=str(tmp_path / "out.pt"))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    # the child runs with torch's default thread count, the test worker with one: reductions may differ by ~1e-7
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-5, atol=1e-6)


def test_short_training_lowers_the_loss():
    model = vp.attach(tiny_vit(), "vqt", num_tokens=2)
    losses = training_losses(model, steps=30, lr=3e-2)
    assert losses[-1] < 0.7 * losses[0]
    assert vqt_of(model).tower.tokens.extra_prefix == 0  # the queries leave the layout as they found it


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_tokens": 0}, "method 'vqt' option 'num_tokens' must be at least 1, got 0"),
        ({"dropout": 1.0}, "method 'vqt' option 'dropout' must be below 1, got 1.0"),
        ({"normalize": "yes"}, "method 'vqt' option 'normalize' must be bool, got 'yes'"),
    ],
)
def test_bad_options_are_one_line(options, message):
    model = tiny_vit()
    with pytest.raises(ConfigError) as err:
        vp.attach(model, "vqt", **options)
    assert str(err.value) == message
    assert not vp.attached_methods(model)


@pytest.mark.parametrize(
    ("factory", "options", "words"),
    [
        (lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)), {}, "vqt needs a ViT-style token sequence"),
        (lambda: tiny_vit(num_classes=0), {}, "one linear classification head; the model's heads are: none"),
        (lambda: tiny_clip(), {}, "the model's heads are: none"),
        (lambda: probe(tiny_clip()), {"tower": "text"}, "vqt needs a ViT-style token sequence"),
        (lambda: CASES["dit"].factory(), {}, "vqt needs a ViT-style token sequence"),
        (lambda: batchnorm_head(tiny_vit()), {}, "head: Sequential"),
    ],
    ids=["generic", "vit-without-head", "clip-without-head", "clip-text", "dit", "batchnorm-head"],
)
def test_a_model_it_does_not_fit_is_one_line(factory, options, words):
    model = factory()
    keys = set(model.state_dict())
    with pytest.raises(IncompatibleMethodError) as err:
        vp.attach(model, "vqt", **options)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert set(model.state_dict()) == keys and not vp.attached_methods(model)


def batchnorm_head(model):
    from visionpeft.backbones.factory import recipe_head

    recipe_head(model, "batchnorm", None)
    return model


@pytest.mark.slow
def test_tools_train_runs_vqt_on_the_demo(tmp_path):
    from _demo_utils import CHECKPOINT, MAIN_CONFIG

    args = [
        sys.executable,
        str(ROOT / "tools" / "train.py"),
        str(MAIN_CONFIG),
        "method={name: vqt, num_tokens: 2}",
        "optim.epochs=1",
        f"model.checkpoint={CHECKPOINT}",
        f"train.output_dir={tmp_path}",
        "train.run_name=vqt",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    last = (tmp_path / "vqt" / "metrics.jsonl").read_text().strip().splitlines()[-1]
    assert '"test/top1"' in last and float(last.split('"test/top1": ')[1].split(",")[0]) > 0.2  # chance: 0.1
