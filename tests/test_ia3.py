"""(IA)^3 (Liu et al. 2022): counts and outputs equal PEFT's IA3 layers for the same modules (timm ViT, ViT-B/16 on the
meta device, a diffusers U-Net's Linear and Conv2d layers, a ConvNeXt's depthwise convs through the generic family),
k / v rows of timm's fused qkv, open_clip's nn.MultiheadAttention in weight space, unchanged at init, exact merge (also
beside LoRA / DoRA / LoHa / OFT / FacT / SSF in either attach order, or a one-line refusal), detach, save / load,
PEFT's folder loaded by ``PeftModel.from_pretrained`` with equal outputs, training and bad options.

PEFT reference: ``peft/tuners/ia3/layer.py`` (0.21): ``Linear.forward`` multiplies the output by ``ia3_l`` of shape
(out, 1), or for a feed-forward module the input by ``ia3_l`` of shape (1, in); ``_ConvNd`` keeps (1, channels, 1, 1).
"""

from __future__ import annotations

import json

import peft
import pytest
import timm
import torch
from test_any_backbone import convnext
from test_any_backbone import run as run_generic
from test_repadapter import outputs_in_new_process
from tiny_models import CASES, assert_same_state, perturb, tiny_clip, tiny_dit, tiny_unet, tiny_vit, training_losses

import visionpeft as vp
from visionpeft.adapter import backbone_of
from visionpeft.checkpoint.folder import adapter_state_dict
from visionpeft.errors import CheckpointError, ConfigError, IncompatibleMethodError
from visionpeft.methods import make_config
from visionpeft.methods.ia3 import peft_feedforward, peft_feedforward_spec

D, DEPTH, HIDDEN = 768, 12, 3072
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def vitb16():
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)


def peft_ia3(model, target_modules, feedforward_modules):
    config = peft.IA3Config(target_modules=target_modules, feedforward_modules=feedforward_modules)
    return peft.get_peft_model(model, config)


def peft_vectors(model):
    """PEFT's ``ia3_l`` tensors by module path (relative to the model PEFT wrapped)."""
    return {
        path.removeprefix("base_model.model."): module.ia3_l["default"]
        for path, module in model.named_modules()
        if isinstance(module, peft.tuners.ia3.IA3Layer)
    }


def copy_into_peft(theirs, vectors):
    """Writes ``vectors`` (module path -> 1-D vector) into PEFT's layers, in PEFT's shapes."""
    with torch.no_grad():
        for path, target in peft_vectors(theirs).items():
            target.copy_(vectors[path].view(target.shape))


def path_vectors(ours):
    """Our vectors by module path, for an ia3 attached with ``target_modules``."""
    return {name.removesuffix(".ia3_l"): t for name, t in adapter_state_dict(ours).items() if name.endswith("ia3_l")}


# -- counts --------------------------------------------------------------------------------------------------------

PEFT_CONFIGS = [
    (["qkv", "fc2"], ["fc2"]),
    (["qkv", "proj", "fc1", "fc2"], ["fc1", "fc2"]),
    (r"blocks\.\d+\.(attn\.qkv|mlp\.fc\d)", r".*fc1"),
]


@pytest.mark.parametrize("model_factory", [tiny_vit, vitb16], ids=["tiny-vit", "vit-b16-meta"])
@pytest.mark.parametrize(("targets", "feedforward"), PEFT_CONFIGS, ids=["qkv-fc2", "all-linear", "regex"])
def test_count_equals_peft(model_factory, targets, feedforward):
    ours = vp.attach(model_factory(), "ia3", target_modules=targets, feedforward_modules=feedforward)
    theirs = peft_ia3(model_factory(), targets, feedforward)
    assert vp.count_parameters(ours)["by_group"]["ia3"] == sum(v.numel() for v in peft_vectors(theirs).values())
    assert {n: tuple(v.shape) for n, v in path_vectors(ours).items()} == {
        n: (v.numel(),) for n, v in peft_vectors(theirs).items()
    }


def test_vitb16_default_count_is_the_papers_k_v_ff():
    counts = vp.count_parameters(vp.attach(vitb16(), "ia3"))
    assert counts["by_group"]["ia3"] == DEPTH * (D + D + HIDDEN) == 55_296
    assert counts["trainable"] == 55_296 + D * 100 + 100
    whole_qkv = vp.attach(vitb16(), "ia3", target_modules=["qkv", "fc2"], feedforward_modules=["fc2"])
    assert vp.count_parameters(whole_qkv)["by_group"]["ia3"] == DEPTH * (3 * D + HIDDEN) == 64_512


# -- outputs equal PEFT's ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("targets", "feedforward"), PEFT_CONFIGS, ids=["qkv-fc2", "all-linear", "regex"])
def test_vit_forward_equals_peft_with_the_same_vectors(targets, feedforward):
    ours = perturb(vp.attach(tiny_vit(), "ia3", target_modules=targets, feedforward_modules=feedforward))
    theirs = peft_ia3(tiny_vit(), targets, feedforward)
    copy_into_peft(theirs, path_vectors(ours))
    with torch.no_grad():
        theirs.base_model.model.head.load_state_dict(ours.head.state_dict())
        torch.testing.assert_close(ours(IMAGES), theirs(IMAGES), rtol=1e-5, atol=1e-5)


def test_k_v_rows_of_the_fused_qkv_equal_peft_on_qkv_with_q_rows_one():
    ours = perturb(vp.attach(tiny_vit(), "ia3"))  # targets k, v, fc2; fc2 a feed-forward module
    tensors = adapter_state_dict(ours)
    assert tensors["blocks.0.attn.k.ia3_l"].shape == (32,) and tensors["blocks.0.mlp.fc2.ia3_l"].shape == (128,)
    theirs = peft_ia3(tiny_vit(), ["qkv", "fc2"], ["fc2"])
    vectors = {}
    for i in range(2):
        k, v = tensors[f"blocks.{i}.attn.k.ia3_l"], tensors[f"blocks.{i}.attn.v.ia3_l"]
        vectors[f"blocks.{i}.attn.qkv"] = torch.cat([torch.ones(32), k.detach(), v.detach()])
        vectors[f"blocks.{i}.mlp.fc2"] = tensors[f"blocks.{i}.mlp.fc2.ia3_l"]
    copy_into_peft(theirs, vectors)
    with torch.no_grad():
        theirs.base_model.model.head.load_state_dict(ours.head.state_dict())
        torch.testing.assert_close(ours(IMAGES), theirs(IMAGES), rtol=1e-5, atol=1e-5)


UNET_TARGETS = ["to_k", "to_v", "ff.net.2", "conv1", "conv2"]


def test_unet_linear_and_conv2d_equal_peft():
    run = CASES["unet"].run
    ours = perturb(
        vp.attach(tiny_unet(), "ia3", target_modules=UNET_TARGETS, feedforward_modules=["ff.net.2", "conv2"])
    )
    theirs = peft_ia3(tiny_unet(), UNET_TARGETS, ["ff.net.2", "conv2"])
    vectors = path_vectors(ours)
    assert vectors["down_blocks.0.resnets.0.conv2"].shape == (16,)
    assert peft_vectors(theirs)["down_blocks.0.resnets.0.conv2"].shape == (1, 16, 1, 1)
    copy_into_peft(theirs, vectors)
    with torch.no_grad():
        torch.testing.assert_close(run(ours), run(theirs), rtol=1e-5, atol=1e-5)


def test_depthwise_convs_of_the_generic_family_equal_peft_and_merge():
    """ConvNeXt's grouped (depthwise) convs as feed-forward modules: PEFT scales their input per channel; the merge
    folds it into each group's columns."""
    targets, feedforward = ["conv_dw", "fc1", "fc2"], ["conv_dw", "fc2"]
    ours = perturb(vp.attach(convnext(), "ia3", target_modules=targets, feedforward_modules=feedforward))
    assert backbone_of(ours).family == "generic"
    theirs = peft_ia3(convnext(), targets, feedforward)
    copy_into_peft(theirs, path_vectors(ours))
    with torch.no_grad():
        theirs.base_model.model.head.load_state_dict(ours.head.state_dict())
        adapted = run_generic(ours)
        torch.testing.assert_close(adapted, run_generic(theirs), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run_generic(vp.merge(ours)), adapted, rtol=1e-5, atol=1e-5)


def test_open_clip_attention_scales_in_proj_rows_in_weight_space():
    """On nn.MultiheadAttention the k / v vectors multiply the rows of in_proj_weight and in_proj_bias (PEFT has no
    layer for it): the same attention with those weights written in by hand."""
    ours = perturb(vp.attach(tiny_clip(), "ia3", targets=["k", "v", "o", "fc2"]))
    tensors = adapter_state_dict(ours)
    reference = tiny_clip()
    with torch.no_grad():
        for i, blk in enumerate(reference.visual.transformer.resblocks):
            attn, name = blk.attn, f"blocks.{i}"
            for j, slot in ((1, "k"), (2, "v")):
                rows = slice(j * 32, (j + 1) * 32)
                attn.in_proj_weight[rows] *= tensors[f"{name}.attn.{slot}.ia3_l"][:, None]
                attn.in_proj_bias[rows] *= tensors[f"{name}.attn.{slot}.ia3_l"]
            attn.out_proj.weight *= tensors[f"{name}.attn.o.ia3_l"][:, None]
            attn.out_proj.bias *= tensors[f"{name}.attn.o.ia3_l"]
            blk.mlp.c_proj.weight *= tensors[f"{name}.mlp.fc2.ia3_l"][None, :]  # fc2: its input
        torch.testing.assert_close(ours.encode_image(IMAGES), reference.encode_image(IMAGES), rtol=1e-5, atol=1e-5)


# -- init, merge, detach, files, training --------------------------------------------------------------------------

FAMILIES = [
    ("vit", {}),
    ("vit", {"targets": ["q", "k", "v", "o", "fc1", "fc2"], "feedforward_modules": ["fc1", "o"]}),
    ("vit", {"target_modules": ["qkv", "fc2"], "feedforward_modules": ["qkv"]}),
    ("clip_vision", {}),
    ("clip_vision", {"targets": ["q", "k", "v", "o"], "feedforward_modules": ["q", "o"]}),
    ("clip_vision_lnd", {"target_modules": ["attn"], "feedforward_modules": []}),
    ("clip_text", {"tower": "text"}),
    ("unet", {"targets": ["k", "v", "fc2", "conv1", "conv2"], "feedforward_modules": ["fc2", "conv2"]}),
    ("dit", {}),
]
FAMILY_IDS = [f"{case}-{'-'.join(options) or 'default'}" for case, options in FAMILIES]


@pytest.mark.parametrize(("case", "options"), FAMILIES, ids=FAMILY_IDS)
def test_unchanged_at_init_merge_and_detach_on_every_family(case, options):
    c = CASES[case]
    with torch.no_grad():
        reference = c.run(c.factory())
    model = vp.attach(c.factory(), "ia3", **options)
    with torch.no_grad():  # ones: exact, up to nn.MultiheadAttention's fast path off the weight-space call (a few
        # float32 ulps: 1.07e-6 on an output of 1.2 with torch 2.14)
        torch.testing.assert_close(c.run(model), reference, rtol=2e-6, atol=1e-6)
        perturb(model, std=0.05)
        adapted = c.run(model)
        assert (adapted - reference).abs().max() > 1e-4
    merged = vp.merge(perturb(vp.attach(c.factory(), "ia3", **options), std=0.05))
    with torch.no_grad():
        torch.testing.assert_close(c.run(merged), adapted, rtol=1e-5, atol=1e-5)
    assert set(merged.state_dict()) == set(c.factory().state_dict())
    vp.detach(model)
    assert_same_state(model, c.factory())
    with torch.no_grad():
        torch.testing.assert_close(c.run(model), reference, rtol=0, atol=0)


def test_init_ia3_weights_false_draws_a_standard_normal():
    vectors = [
        t for n, t in adapter_state_dict(vp.attach(tiny_vit(), "ia3", init_ia3_weights=False)).items() if "ia3" in n
    ]
    values = torch.cat([v.detach() for v in vectors])
    assert values.numel() == 384 and abs(values.mean()) < 0.2 and abs(values.std() - 1) < 0.2


LORA = ("lora", {"targets": ["q", "v", "fc2"], "r": 4})
OFT = ("oft", {"targets": ["v", "fc2"], "oft_block_size": 8})
LOHA = ("loha", {"targets": ["v", "fc2"], "r": 2})


@pytest.mark.parametrize(
    "methods",
    [
        [LORA, ("ia3", {})],
        [("ia3", {}), LORA],
        [("lora", {**LORA[1], "use_dora": True}), ("ia3", {})],
        [("fact", {}), ("ia3", {"targets": ["q", "o", "fc2"]})],
        [("ia3", {"targets": ["q", "o", "fc2"], "feedforward_modules": []}), ("fact", {})],
        [("ssf", {}), ("ia3", {"targets": ["k", "o", "fc1", "fc2"], "feedforward_modules": ["fc2"]})],
        [("ia3", {"targets": ["k", "o", "fc1", "fc2"], "feedforward_modules": []}), ("ssf", {})],
        [("ia3", {}), ("difffit", {})],
        [("ia3", {}), OFT],  # OFT runs fc2 on W R: the scaled input meets R, so R folds first
        [OFT, ("ia3", {})],
        [("ia3", {}), LOHA],
        [LOHA, ("ia3", {})],
    ],
    ids=["lora-ia3", "ia3-lora", "dora-ia3", "fact-ia3", "ia3-fact", "ssf-ia3", "ia3-ssf", "ia3-difffit"]
    + ["ia3-oft", "oft-ia3", "ia3-loha", "loha-ia3"],
)
def test_merge_beside_other_methods_on_the_same_layers(methods):
    """Attached after an additive update of a layer the vectors scale it too and fold after it; before it, only the
    base layer's, and fold first. SSF's shift is scaled or not by the same rule."""
    model = perturb(vp.attach(tiny_vit(), methods), std=0.05)
    with torch.no_grad():
        before = model(IMAGES)
        torch.testing.assert_close(vp.merge(model)(IMAGES), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("factory", "methods", "words"),
    [
        (tiny_vit, [("ia3", {}), ("lora", {**LORA[1], "use_dora": True})], "DoRA"),
        # fact's later hooks: outside the qkv scale (fold it first) but inside fc2's input scale (fold it after)
        (tiny_vit, [("ia3", {}), ("fact", {})], "no merge order"),
        (tiny_clip, [("lora", {}), ("ia3", {})], "already rewrites the weights"),
        (tiny_clip, [("ia3", {}), ("lora", {})], "already carries"),
    ],
    ids=["dora-after-ia3", "fact-after-ia3-ff", "ia3-on-lora-attention", "lora-on-ia3-attention"],
)
def test_what_cannot_merge_or_share_an_attention_is_one_line(factory, methods, words):
    with pytest.raises(IncompatibleMethodError) as err:
        model = vp.attach(factory(), methods)
        vp.merge(model)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_dora_after_ia3_refuses_before_anything_merged():
    model = vp.attach(tiny_vit(), [("ia3", {}), ("lora", {**LORA[1], "use_dora": True})])
    with pytest.raises(IncompatibleMethodError):
        vp.merge(model)
    assert [name for name, _ in vp.attached_methods(model)] == ["ia3", "lora"]


def test_save_load_round_trip_and_detach(tmp_path):
    options = {"targets": ["k", "v", "o", "fc2"], "feedforward_modules": ["fc2", "o"]}
    model = perturb(vp.attach(tiny_vit(), "ia3", **options))
    with torch.no_grad():
        trained = model(IMAGES)
    vp.save_adapter(model, tmp_path)
    fresh = vp.load_adapter(tiny_vit(), tmp_path)
    assert vp.attached_methods(fresh)[0][1].feedforward_modules == ("fc2", "o")
    with torch.no_grad():
        torch.testing.assert_close(fresh(IMAGES), trained, rtol=0, atol=0)


@pytest.mark.slow
def test_save_load_in_a_new_process(tmp_path):
    model = perturb(vp.attach(tiny_vit(), "ia3"))
    with torch.no_grad():
        trained = model(IMAGES)
    vp.save_adapter(model, tmp_path / "adapter")
    reloaded = outputs_in_new_process("tiny_vit", tmp_path / "adapter", IMAGES, tmp_path)
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-6)


def test_short_training_lowers_the_loss():
    model = vp.attach(tiny_vit(), "ia3")
    losses = training_losses(model, steps=30, lr=3e-2)
    assert losses[-1] < 0.7 * losses[0]
    vectors = [t for n, t in adapter_state_dict(model).items() if n.endswith("ia3_l")]
    assert all((v - 1).abs().max() > 0 for v in vectors)  # every vector trained


# -- PEFT's folder ----------------------------------------------------------------------------------------------------

PEFT_FOLDERS = [
    (tiny_vit, CASES["vit"].run, {}),  # k / v rows of the fused qkv (PEFT: one qkv vector, q rows 1), fc2's input
    (tiny_unet, CASES["unet"].run, {"target_modules": UNET_TARGETS, "feedforward_modules": ["ff.net.2", "conv2"]}),
    (convnext, run_generic, {"target_modules": ["conv_dw", "fc1", "fc2"], "feedforward_modules": ["conv_dw"]}),
    (tiny_dit, CASES["dit"].run, {"target_modules": ["to_k", "to_v", "ff.net.2"], "feedforward_modules": ["ff.net.2"]}),
]


@pytest.mark.parametrize(
    ("factory", "run", "options"), PEFT_FOLDERS, ids=["vit-k-v-ff", "unet-conv", "convnext-dw", "dit"]
)
def test_peft_loads_the_exported_folder_with_equal_outputs(factory, run, options, tmp_path):
    ours = perturb(vp.attach(factory(), "ia3", **options))
    vp.save_adapter(ours, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"]
    assert set(config["feedforward_modules"]) < set(config["target_modules"])
    loaded = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(run(loaded), run(ours), rtol=1e-5, atol=1e-5)


def test_the_default_folder_holds_peft_files_beside_ours(tmp_path):
    ours = perturb(vp.attach(tiny_vit(), "ia3"))
    vp.save_adapter(ours, tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    with torch.no_grad():
        torch.testing.assert_close(peft.PeftModel.from_pretrained(tiny_vit(), tmp_path).eval()(IMAGES), ours(IMAGES))
        torch.testing.assert_close(vp.load_adapter(tiny_vit(), tmp_path)(IMAGES), ours(IMAGES), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("factory", "methods", "words"),
    [
        (tiny_clip, ["ia3"], "not nn.MultiheadAttention"),
        (tiny_vit, ["ia3", "lora"], "one adapter type"),
    ],
    ids=["open_clip-attention", "with-lora"],
)
def test_what_a_peft_folder_cannot_hold_is_one_line(factory, methods, words, tmp_path):
    model = perturb(vp.attach(factory(), methods))
    with pytest.raises(CheckpointError) as err:
        vp.save_adapter(model, tmp_path / "peft", format="peft")
    assert words in str(err.value) and "\n" not in str(err.value)
    vp.save_adapter(model, tmp_path / "ours")  # the default folder: ours alone
    assert "adapter_config.json" not in {p.name for p in (tmp_path / "ours").iterdir()}


def test_feedforward_paths_peft_would_widen_are_written_as_one_regex():
    targets = ["blocks.0.mlp.fc2", "xblocks.0.mlp.fc2"]
    assert peft_feedforward_spec(targets, ["xblocks.0.mlp.fc2"]) == ["xblocks.0.mlp.fc2"]
    spec = peft_feedforward_spec(targets, ["blocks.0.mlp.fc2"])  # PEFT's endswith would take xblocks' too
    assert [t for t in targets if peft_feedforward(t, spec)] == ["blocks.0.mlp.fc2"]


# -- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"feedforward_modules": ["fc1"]}, "'fc1', which is not one of its targets"),
        ({"target_modules": ["qkv"], "feedforward_modules": ["fc2"]}, "'fc2', which is not one of its target_modules"),
    ],
)
def test_a_feedforward_module_that_is_no_target_is_refused_with_the_options(options, words):
    with pytest.raises(ConfigError) as err:
        make_config("ia3", options)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("factory", "options", "error", "words"),
    [
        (tiny_vit, {"targets": ["k", "fc3"]}, ConfigError, "target 'fc3' does not exist"),
        (tiny_vit, {"target_modules": ["qkvv"]}, ConfigError, "did you mean 'qkv'"),
        (tiny_vit, {"target_modules": ["norm1"]}, ConfigError, "LayerNorm"),
        (
            tiny_vit,
            {"feedforward_modules": r"fc2"},
            ConfigError,
            "selects none of the modules its targets select (e.g. blocks.0.attn.k); one string is a regex",
        ),
        (tiny_vit, {"targets": ["k", "v"], "feedforward_modules": ["k"]}, IncompatibleMethodError, "fused qkv"),
        (tiny_clip, {"target_modules": ["out_proj"]}, IncompatibleMethodError, "select the attention module"),
        (lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)), {}, ConfigError, "needs target_modules"),
    ],
    ids=[
        "unknown-target",
        "unknown-module",
        "layernorm",
        "feedforward-regex-none",
        "fused-slice-input",
        "out-proj",
        "generic",
    ],
)
def test_bad_input_is_one_line_and_leaves_the_model(factory, options, error, words):
    model = factory()
    keys = set(model.state_dict())
    with pytest.raises(error) as err:
        vp.attach(model, "ia3", **options)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert set(model.state_dict()) == keys and not vp.attached_methods(model)


def eva(**overrides):
    from timm.models.eva import Eva

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, qkv_bias=True)
    return Eva(**{**kw, "use_rot_pos_emb": True, "ref_feat_shape": (4, 4), **overrides}).eval()


def test_eva_fused_qkv_with_outside_biases_is_one_line_and_separate_projections_merge():
    with pytest.raises(IncompatibleMethodError) as err:
        vp.attach(eva(), "ia3")
    assert "q/v biases" in str(err.value) and "\n" not in str(err.value)
    model = perturb(vp.attach(eva(qkv_fused=False, swiglu_mlp=True), "ia3"))
    with torch.no_grad():
        adapted = model(IMAGES)
        assert (adapted - eva(qkv_fused=False, swiglu_mlp=True)(IMAGES)).abs().max() > 1e-3
        torch.testing.assert_close(vp.merge(model)(IMAGES), adapted, rtol=1e-5, atol=1e-5)
