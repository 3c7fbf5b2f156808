"""Public API behaviour: validation, errors, hybrids, train mode, checkpoints that do not fit."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from tiny_models import _run_vit, tiny_clip, tiny_unet, tiny_vit

import visionpeft as vp
from visionpeft.errors import CheckpointError, ConfigError, IncompatibleMethodError, UnsupportedBackboneError
from visionpeft.layers.lora import LoRALinear, LoRAMultiheadAttention
from visionpeft.methods import make_config


def test_make_config_validates_names_and_types():
    cfg = make_config("lora", {"r": 4, "targets": "q,v", "alpha": 8})
    assert cfg.r == 4 and cfg.targets == ("q", "v") and cfg.alpha == 8.0
    with pytest.raises(ConfigError, match="did you mean 'num_tokens'"):
        make_config("vpt", {"num_token": 5})
    with pytest.raises(ConfigError, match="option 'deep' must be bool"):
        make_config("vpt", {"deep": "yes"})
    with pytest.raises(ConfigError, match="option 'r' must be int"):
        make_config("lora", {"r": 2.5})
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        make_config("lorra", {})


def test_unknown_lora_target_suggests_one(vit):
    with pytest.raises(ConfigError, match="did you mean 'fc2'"):
        vp.attach(vit, "lora", targets=["fc3"])
    assert not vp.attached_methods(vit)


def test_unsupported_object_is_a_clear_error():
    with pytest.raises(UnsupportedBackboneError, match="cannot adapt a types.SimpleNamespace"):
        vp.attach(types.SimpleNamespace(), "lora")
    with pytest.raises(ConfigError, match="lora on a Linear .* needs target_modules"):  # any module: by path
        vp.attach(torch.nn.Linear(3, 3), "lora")


def test_same_method_twice_on_one_tower_is_refused(vit):
    vp.attach(vit, "lora")
    with pytest.raises(ConfigError, match="already attached"):
        vp.attach(vit, "lora", r=2)
    clip = tiny_clip()
    vp.attach(clip, [("lora", {}), ("lora", {"tower": "text"})])  # one per tower is fine
    assert [n for n, _ in vp.attached_methods(clip)] == ["lora", "lora"]


def test_failed_hybrid_attach_rolls_back():
    unet = tiny_unet()
    keys = set(unet.state_dict())
    with pytest.raises(IncompatibleMethodError):
        vp.attach(unet, [("lora", {}), ("convpass", {})])
    assert set(unet.state_dict()) == keys and not vp.attached_methods(unet)


def test_hybrid_vpt_lora_convpass_trains_and_round_trips(tmp_path):
    model = vp.attach(tiny_vit(), [("vpt", {"num_tokens": 2, "deep": True}), ("lora", {"r": 2}), ("convpass", {})])
    counts = vp.count_parameters(model)
    assert set(counts["by_group"]) == {"vpt", "lora", "convpass", "head"}
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    out = _run_vit(model)
    vp.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "visionpeft_config.json").read_text())
    assert [m["name"] for m in saved["methods"]] == ["vpt", "lora", "convpass"]
    assert {"torch", "timm", "visionpeft"} <= set(saved["versions"])
    torch.testing.assert_close(_run_vit(vp.load_adapter(tiny_vit(), tmp_path)), out, rtol=0, atol=0)
    with pytest.raises(IncompatibleMethodError, match="vpt, convpass cannot be merged"):
        vp.merge(model)
    vp.merge(model, methods=["lora"])  # the mergeable part alone
    torch.testing.assert_close(_run_vit(model), out, rtol=1e-5, atol=1e-5)
    assert [n for n, _ in vp.attached_methods(model)] == ["vpt", "convpass"]


def test_set_train_mode_keeps_frozen_backbone_in_eval_for_vpt():
    model = vp.attach(tiny_vit(), "vpt", dropout=0.1)
    vp.set_train_mode(model, True)
    assert not model.blocks[0].attn.training and not model.training
    prompts = [m for m in model.modules() if getattr(m, "_vp_owned", False)]
    assert prompts and all(m.training for p in prompts for m in p.modules())
    assert model.head.training
    lora = vp.attach(tiny_vit(), "lora", dropout=0.1)
    vp.set_train_mode(lora, True)
    assert all(m.training for m in lora.modules())  # LoRA trains with the backbone in train mode


def test_deepcopy_keeps_a_working_independent_adapter():
    model = vp.attach(tiny_vit(), "adaptformer", bottleneck=4)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(clone):
            p.add_(0.1)
    assert not torch.equal(_run_vit(clone), _run_vit(model))
    vp.detach(clone)
    torch.testing.assert_close(_run_vit(clone), _run_vit(tiny_vit()), rtol=0, atol=0)


def test_checkpoint_from_another_architecture_names_the_tensors(tmp_path):
    vp.save_adapter(vp.attach(tiny_vit(), "lora"), tmp_path / "a")
    wider = tiny_vit(embed_dim=48)
    with pytest.raises(
        CheckpointError, match=r"shape mismatch: blocks\.0\.attn\.q\.lora_A \(8, 32\) vs model \(8, 48\)"
    ):
        vp.load_adapter(wider, tmp_path / "a")
    with pytest.raises(CheckpointError, match="adapter for a timm_vit backbone"):
        vp.load_adapter(tiny_clip(), tmp_path / "a")
    vp.save_adapter(vp.attach(tiny_vit(depth=3), "lora"), tmp_path / "deep")
    with pytest.raises(CheckpointError, match=r"unexpected: blocks\.2\.attn\.q\.lora_A"):
        vp.load_adapter(tiny_vit(), tmp_path / "deep")


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="visionpeft_config.json is missing"):
        vp.load_adapter(tiny_vit(), tmp_path)
    vp.save_adapter(vp.attach(tiny_vit(), "lora"), tmp_path)
    (tmp_path / "visionpeft_adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        vp.load_adapter(tiny_vit(), tmp_path)


def test_fused_qv_lora_touches_only_q_and_v_rows():
    layer = torch.nn.Linear(8, 24)
    lora = LoRALinear(layer, {"q": (0, 8), "v": (16, 24)}, r=2, alpha=4, dropout=0.0)
    with torch.no_grad():
        for u in lora.updates.values():
            u.lora_B.normal_()
    x = torch.randn(5, 8)
    delta = lora(x) - layer(x)
    assert delta[:, 8:16].abs().max() == 0 and delta[:, :8].abs().max() > 0 and delta[:, 16:].abs().max() > 0
    before = layer.weight.clone()
    unmerged = lora(x)
    lora.merge(1.0)
    torch.testing.assert_close(lora(x), unmerged, rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.weight[8:16], before[8:16])
    lora.merge(-1.0)
    torch.testing.assert_close(layer.weight, before, rtol=0, atol=1e-6)
    torch.testing.assert_close(lora(x), unmerged, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_lora_matches_torch(batch_first):
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=batch_first).eval()
    lora = LoRAMultiheadAttention(mha, ("q", "v", "o"), r=2, alpha=2).eval()
    x = torch.randn(3, 4, 16)
    mask = torch.triu(torch.full((4 if batch_first else 3,) * 2, float("-inf")), 1)
    ref, _ = mha(x, x, x, need_weights=False, attn_mask=mask)
    out, _ = lora(x, x, x, need_weights=False, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for u in lora.updates.values():
            u.lora_B.normal_()
    unmerged, _ = lora(x, x, x, need_weights=False, attn_mask=mask)
    assert not torch.allclose(unmerged, ref)
    lora.merge(1.0)
    torch.testing.assert_close(mha(x, x, x, need_weights=False, attn_mask=mask)[0], unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora_first", [True, False])
def test_a_hook_on_a_lora_wrapped_attention_still_runs(lora_first):
    """DiffFit's gamma hooks open_clip's nn.MultiheadAttention; LoRA's weight-space attention runs that module's own
    call on its weights, so the gamma counts (it was skipped in both attach orders) and the two merge exactly."""
    lora = ("lora", {"targets": ["q", "v", "o"]})
    model = vp.attach(tiny_clip(), [lora, ("difffit", {})] if lora_first else [("difffit", {}), lora])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gamma = model.visual.transformer.resblocks[0].vp_difffit_0.gamma
    with torch.no_grad():
        before = model.encode_image(x)
        gamma.mul_(3)
        for _, p in vp.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
        adapted = model.encode_image(x)
        assert (adapted - before).abs().max() > 1e-2
        torch.testing.assert_close(vp.merge(model).encode_image(x), adapted, rtol=1e-5, atol=1e-5)


def test_failed_load_leaves_the_model_as_it_was(tmp_path):
    vp.save_adapter(vp.attach(tiny_vit(), "lora"), tmp_path)
    wider = tiny_vit(embed_dim=48)
    keys = set(wider.state_dict())
    with pytest.raises(CheckpointError):
        vp.load_adapter(wider, tmp_path)
    assert set(wider.state_dict()) == keys and not vp.attached_methods(wider)


@pytest.mark.parametrize("overrides", [{}, {"reg_tokens": 2, "global_pool": "avg"}])
def test_vpt_prompts_leave_the_token_layout_after_the_last_block(overrides):
    model = tiny_vit(**overrides)
    x = torch.randn(2, 3, 32, 32)
    shape = model.forward_features(x).shape
    vp.attach(model, "vpt", num_tokens=4, deep=True)
    seen = []
    handle = model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    assert model.forward_features(x).shape == shape  # pooling never sees prompt tokens
    handle.remove()
    assert seen == [shape[1] + 4]  # ... but every block does


@pytest.mark.parametrize("scale", ["ssf", "ia3"])
def test_merging_a_wrapper_alone_refuses_when_a_kept_scale_hooks_it(scale):
    """A scale attached after a LoRA hooks the LoRA layer; merging the LoRA alone would drop the scale's hook with the
    wrapper (the model silently changed before). It is refused in one line, nothing merged; merged together, exact."""
    torch.manual_seed(0)
    model = vp.attach(tiny_vit(), [("lora", {"r": 2}), (scale, {})])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(IncompatibleMethodError, match=f"{scale} hooks a layer that lora wraps") as err:
        vp.merge(model, methods=["lora"])
    assert "\n" not in str(err.value)
    assert [name for name, _ in vp.attached_methods(model)] == ["lora", scale]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        vp.merge(model, methods=["lora", scale])
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
