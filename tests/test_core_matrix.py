"""The method x backbone matrix: init, gradients, merge, detach and save/load on every supported pair."""

from __future__ import annotations

from functools import partial

import pytest
import tiny_models
import torch
from tiny_models import CASES

import visionpeft as vp
from visionpeft.errors import IncompatibleMethodError
from visionpeft.methods import METHODS

ALL_LORA = {"targets": ["q", "k", "v", "o", "fc1", "fc2"], "r": 4}
MATRIX = [
    ("vit", "vpt", {"num_tokens": 3}),
    ("vit", "vpt", {"num_tokens": 3, "deep": True, "dropout": 0.1}),
    ("vit", "adaptformer", {"bottleneck": 8}),
    ("vit", "convpass", {}),
    ("vit", "lora", {}),
    ("vit", "lora", ALL_LORA),
    ("vit", "difffit", {}),
    ("vit", "ssf", {"init_std": 0.0}),  # the official init is random; std 0 starts as the identity
    ("vit", "bitfit", {}),
    ("vit", "ln_tune", {}),
    ("vit", "fact", {}),
    ("vit", "fact", {"variant": "tk", "dim": 4}),
    ("vit", "linear", {}),
    ("vit", "full", {"keep_original": True}),
    ("vit_reg_avg", "vpt", {"num_tokens": 3, "deep": True}),
    ("vit_reg_avg", "convpass", {}),
    ("vit_reg_avg", "difffit", {}),
    ("vit_reg_avg", "fact", {"variant": "tk"}),
    ("vit_nocls", "vpt", {"num_tokens": 3}),
    ("vit_nocls", "convpass", {}),
    ("vit_nocls", "lora", ALL_LORA),
    ("vit_nocls", "fact", {}),
    ("clip_timm", "vpt", {"num_tokens": 2, "deep": True}),
    ("clip_timm", "lora", {}),
    ("clip_timm", "difffit", {}),
    ("clip_timm", "fact", {"dropout": 0.0}),
    ("clip_timm", "ssf", {"init_std": 0.0}),
    ("clip_vision", "vpt", {"num_tokens": 2, "deep": True}),
    ("clip_vision", "adaptformer", {"bottleneck": 4}),
    ("clip_vision", "convpass", {}),
    ("clip_vision", "lora", {"targets": ["q", "v", "o", "fc1"]}),
    ("clip_vision", "difffit", {}),
    ("clip_vision", "bitfit", {}),
    ("clip_vision", "ln_tune", {}),
    ("clip_vision", "ssf", {"init_std": 0.0}),  # nn.MultiheadAttention: in weight space
    ("clip_vision", "fact", {"dropout": 0.0}),
    ("clip_vision_lnd", "fact", {"variant": "tk", "dropout": 0.0}),
    ("clip_vision_lnd", "vpt", {"num_tokens": 2, "deep": True}),
    ("clip_vision_lnd", "convpass", {}),
    ("clip_vision_lnd", "lora", {}),
    ("clip_text", "lora", {"tower": "text", "targets": ["q", "k", "v", "o"]}),
    ("clip_text", "adaptformer", {"tower": "text", "bottleneck": 4}),
    ("clip_text", "difffit", {"tower": "text"}),
    ("clip_text", "bitfit", {"tower": "text"}),
    ("clip_text", "ln_tune", {"tower": "text"}),
    ("unet", "lora", {"targets": ["q", "k", "v", "o"], "r": 4}),
    ("unet", "lora", {"targets": ["q", "k", "v", "o", "conv1", "conv2"], "r": 2, "dropout": 0.1}),
    ("unet", "difffit", {}),
    ("unet", "bitfit", {}),
    ("unet", "full", {"keep_original": True}),
    ("dit", "lora", {"targets": ["q", "k", "v", "o", "fc1", "fc2"]}),
    ("dit", "difffit", {}),
    ("dit", "bitfit", {}),
    # [zoo] adapters: RepAdapter (re-parameterisable), Houlsby / Pfeiffer (lora_xavier: the up-projection starts at 0)
    ("vit", "repadapter", {"bottleneck": 4}),
    ("clip_timm", "repadapter", {"bottleneck": 4}),
    ("clip_vision", "repadapter", {"bottleneck": 4}),
    ("clip_vision_lnd", "repadapter", {"bottleneck": 4}),
    ("vit", "adapter", {"bottleneck": 4, "init": "lora_xavier"}),
    ("vit", "vqt", {"num_tokens": 2}),
    ("vit_reg_avg", "vqt", {}),
    ("vit", "vp", {"prompt_size": 4}),
    ("vit_reg_avg", "adapter", {"style": "pfeiffer", "bottleneck": 4, "init": "lora_xavier"}),
    ("clip_vision", "adapter", {"bottleneck": 4, "init": "lora_xavier"}),
    # the LyCORIS family: fused Q / V slices, whole modules by path, nn.MultiheadAttention, U-Net convs, DiT
    ("vit", "loha", {"r": 2}),
    ("vit", "lokr", {"target_modules": ["qkv", "fc1"], "decompose_both": True, "r": 2}),
    ("vit", "oft", {"targets": ["q", "v", "o", "fc2"], "oft_block_size": 8}),
    ("vit", "boft", {"target_modules": ["qkv", "fc2"], "boft_n_butterfly_factor": 2}),
    ("clip_vision", "loha", {"targets": ["q", "v", "o", "fc1"], "r": 2}),
    ("clip_vision", "oft", {"target_modules": ["attn"], "oft_block_size": 8}),
    ("clip_text", "boft", {"tower": "text", "targets": ["k", "fc2"]}),
    ("unet", "lokr", {"targets": ["q", "conv1", "conv2"], "use_effective_conv2d": True, "r": 2}),
    ("unet", "oft", {"targets": ["k", "conv1"], "oft_block_size": 8, "coft": True}),
    ("dit", "boft", {"targets": ["q", "fc1"], "boft_block_num": 4, "boft_block_size": 0}),
    # (IA)^3: fused k / v rows, feed-forward inputs, whole modules by path, nn.MultiheadAttention, U-Net convs, DiT
    ("vit", "ia3", {}),
    ("vit", "ia3", {"target_modules": ["qkv", "proj", "fc1", "fc2"], "feedforward_modules": ["fc1"]}),
    ("clip_vision", "ia3", {"targets": ["q", "k", "v", "o", "fc2"], "feedforward_modules": ["o", "fc2"]}),
    ("clip_text", "ia3", {"tower": "text"}),
    ("unet", "ia3", {"targets": ["k", "v", "fc2", "conv1", "conv2"], "feedforward_modules": ["conv2"]}),
    ("dit", "ia3", {}),
]
#: methods whose official initialisation changes the output: prompts, VQT's query map, VP's pixel frame
STARTS_CHANGED = {"vpt", "vqt", "vp"}
perturb = partial(tiny_models.perturb, std=0.05)  # seed 0 unless given
MERGEABLE = {name for name in METHODS.names() if METHODS.get(name).merges_exactly}  # what the methods declare
IDS = [f"{c}-{m}-{'-'.join(f'{k}={v}' for k, v in o.items() if k != 'targets') or 'default'}" for c, m, o in MATRIX]


@pytest.mark.parametrize(("case", "method", "options"), MATRIX, ids=IDS)
def test_init_gradients_detach(case, method, options):
    c = CASES[case]
    model = c.factory()
    with torch.no_grad():
        reference = c.run(model)
    frozen_before = {n for n, p in model.named_parameters() if p.requires_grad}
    vp.attach(model, method, **options)
    if method not in STARTS_CHANGED:  # every other method starts as the identity
        with torch.no_grad():
            torch.testing.assert_close(c.run(model), reference, rtol=1e-5, atol=1e-5)
    perturb(model)
    trainable = {n for n, _ in vp.trainable_parameters(model)}
    assert trainable, "nothing trainable"
    model.zero_grad(set_to_none=True)
    vp.set_train_mode(model, True)
    torch.manual_seed(0)
    c.run(model).square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable if n.endswith(("lora_B", "prompt")))
    model.eval()
    vp.detach(model)
    with torch.no_grad():
        torch.testing.assert_close(c.run(model), reference, rtol=0, atol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == frozen_before
    assert not any(getattr(m, "_vp_owned", False) or getattr(m, "_vp_wrapper", False) for m in model.modules())


@pytest.mark.parametrize(("case", "method", "options"), MATRIX, ids=IDS)
def test_save_load_and_merge(case, method, options, tmp_path):
    c = CASES[case]
    model = vp.attach(c.factory(), method, **options)
    perturb(model)
    with torch.no_grad():
        trained = c.run(model)
    vp.save_adapter(model, tmp_path)
    fresh = vp.load_adapter(c.factory(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(c.run(fresh), trained, rtol=0, atol=0)
    if method not in MERGEABLE:
        with pytest.raises(IncompatibleMethodError):
            vp.merge(model)
        return
    original_keys = set(c.factory().state_dict())
    vp.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(c.run(model), trained, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == original_keys  # plain library weights again
    assert not vp.attached_methods(model)


@pytest.mark.parametrize(
    ("case", "method", "options"),
    [
        ("unet", "convpass", {}),
        ("unet", "vpt", {}),
        ("unet", "adaptformer", {}),
        ("unet", "linear", {}),
        ("dit", "vpt", {}),
        ("dit", "fact", {}),
        ("clip_vision", "fact", {}),  # dropout on the core output: none in nn.MultiheadAttention's weight space
        ("dit", "ln_tune", {}),  # adaLN-Zero: its LayerNorms have no affine parameters
        ("clip_text", "vpt", {"tower": "text"}),
        ("clip_text", "convpass", {"tower": "text"}),
        ("clip_vision", "linear", {}),
        ("unet", "ssf", {}),
        ("vit", "lora", {"tower": "text"}),
    ],
)
def test_method_that_does_not_fit_is_a_clear_error(case, method, options):
    model = CASES[case].factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleMethodError) as err:
        vp.attach(model, method, **options)
    assert "\n" not in str(err.value)
    assert set(model.state_dict()) == set(before)
    assert not vp.attached_methods(model)


def test_every_method_declaring_an_exact_merge_is_in_the_matrix():
    assert MERGEABLE and MERGEABLE <= {method for _, method, _ in MATRIX}
