"""Checks shared by the tests of the LyCORIS-family methods (loha, lokr, oft, boft): PEFT's layers with the same
weights, PEFT's own initialisation draws and training-time dropouts, counts on ViT-B/16, merge, detach, PEFT folders,
a reload in a new process, composition with other methods, training, and refusals in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import timm
import torch
from tiny_models import CASES, Case, _run_vit, assert_same_state, training_losses

import visionpeft as vp
from visionpeft.adapter import methods_of

ROOT = Path(__file__).resolve().parents[1]
#: timm ViT's Linear layers, each adapted whole (the fused qkv as one module), as PEFT adapts them.
VIT_MODULES = ["qkv", "attn.proj", "fc1", "fc2"]
#: A tiny U-Net's 3x3 resnet convs, 1x1 shortcut / projection convs and attention Linears.
UNET_MODULES = ["conv1", "conv2", "conv_shortcut", "proj_in", "to_q", "to_v"]
#: A DiT's attention and feed-forward Linears.
DIT_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def small_convnet(seed: int = 0) -> torch.nn.Module:
    """A model no family describes (the generic family): a 3x3 and a 1x1 conv, pooling, a Linear."""
    torch.manual_seed(seed)
    layers = [torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 1)]
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)]
    return torch.nn.Sequential(*layers).eval()


#: The tiny models of every family (tiny_models.CASES) and a generic one (its modules: "0", "2", "5").
FAMILIES = {**CASES, "generic": Case("generic", small_convnet, _run_vit)}


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Moves every trainable tensor away from its initial value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def peft_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The attached method's factors under the keys of PEFT's state dict."""
    parts = methods_of(model)[0].export_parts("peft")
    return {f"base_model.model.{key}": tensor for key, tensor in parts.adapter_tensors.items()}


def copy_into_peft(ours: torch.nn.Module, theirs: peft.PeftModel) -> None:
    """Loads our factors and heads into PEFT's model of the same base."""
    result = peft.set_peft_model_state_dict(theirs, peft_tensors(ours))
    assert not result.unexpected_keys
    if hasattr(ours, "head"):
        theirs.base_model.model.head.load_state_dict(ours.head.state_dict())


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def assert_equals_peft(case: str, method: str, options: dict, config: peft.PeftConfig, peft_merged: bool = False):
    """Same trainable count as PEFT's model; both unchanged at initialisation; the same outputs with the same
    factors (``peft_merged``: PEFT's merged weights, where its unmerged forward is not its own layer)."""
    c = FAMILIES[case]
    ours = vp.attach(c.factory(), method, **options)
    theirs = peft.get_peft_model(c.factory(), config).eval()
    assert vp.count_parameters(ours)["by_group"][method] == trainable_count(theirs)
    with torch.no_grad():
        plain = c.run(c.factory())
        torch.testing.assert_close(c.run(ours), plain, rtol=0, atol=1e-6)
        if not peft_merged:
            torch.testing.assert_close(c.run(theirs), plain, rtol=0, atol=1e-6)
    randomize(ours)
    copy_into_peft(ours, theirs)
    if peft_merged:
        theirs.merge_adapter()
    with torch.no_grad():
        adapted = c.run(ours)
        assert (adapted - plain).abs().max() > 1e-2  # the factors really act
        torch.testing.assert_close(adapted, c.run(theirs), rtol=1e-5, atol=1e-5)


def assert_initial_draws_equal_peft(case: str, method: str, options: dict, config: peft.PeftConfig) -> None:
    """With one seed, our factors start at PEFT's values (its initialisation, drawn in its order)."""
    c = FAMILIES[case]
    base_ours, base_theirs = c.factory(), c.factory()
    torch.manual_seed(7)
    ours = vp.attach(base_ours, method, **options)
    torch.manual_seed(7)
    theirs = peft.get_peft_model(base_theirs, config)
    expected = peft.get_peft_model_state_dict(theirs)
    found = peft_tensors(ours)
    assert found.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(found[key], tensor, rtol=0, atol=0, msg=key)


def assert_training_forward_equals_peft(method: str, options: dict, config: peft.PeftConfig) -> None:
    """In training, the dropouts draw what PEFT's draw from the same seed: the same outputs."""
    c = FAMILIES["vit"]
    ours = vp.attach(c.factory(), method, target_modules=VIT_MODULES, **options)
    theirs = peft.get_peft_model(c.factory(), config)
    randomize(ours)
    copy_into_peft(ours, theirs)
    ours.train(), theirs.train()
    for seed in range(3):
        torch.manual_seed(seed)
        sampled = c.run(ours)
        torch.manual_seed(seed)
        torch.testing.assert_close(sampled, c.run(theirs), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (sampled - c.run(ours.eval())).abs().max() > 1e-3  # the dropouts really drop


def vitb16() -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)


def assert_vitb16_counts(method: str, options: dict, config: peft.PeftConfig, qkv: int, q_and_v: int) -> None:
    """ViT-B/16: the whole fused qkv (``target_modules``) trains ``qkv`` parameters, PEFT's count for the same
    config; Q and V slices (``targets``) ``q_and_v``."""
    assert trainable_count(peft.get_peft_model(vitb16(), config)) == qkv
    whole = vp.count_parameters(vp.attach(vitb16(), method, target_modules=["qkv"], **options))
    assert whole["by_group"][method] == qkv and whole["by_group"]["head"] == 768 * 100 + 100
    slices = vp.count_parameters(vp.attach(vitb16(), method, targets=["q", "v"], **options))
    assert slices["by_group"][method] == q_and_v


def assert_merges_exactly_and_detaches(case: str, method: str, options: dict) -> None:
    """merge folds the method into plain library weights with the adapted outputs; detach restores the original
    weights bit for bit."""
    c = FAMILIES[case]
    model = vp.attach(c.factory(), method, **options)
    randomize(model)
    with torch.no_grad():
        adapted = c.run(model)
        assert (adapted - c.run(c.factory())).abs().max() > 1e-3
    detached = vp.detach(vp.attach(c.factory(), method, **options))
    assert_same_state(detached, c.factory())
    vp.merge(model)
    assert not vp.attached_methods(model)
    assert set(model.state_dict()) == set(c.factory().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(c.run(model), adapted, rtol=1e-5, atol=1e-5)


def assert_peft_folder_loads(case: str, method: str, options: dict, tmp_path: Path, peft_type: str) -> None:
    """``save_adapter(format="peft")`` writes PEFT's folder; ``PeftModel.from_pretrained`` gives our outputs; the
    default folder holds the same PEFT files beside visionpeft's."""
    c = FAMILIES[case]
    ours = vp.attach(c.factory(), method, **options)
    randomize(ours)
    vp.save_adapter(ours, tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type
    loaded = peft.PeftModel.from_pretrained(c.factory(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(c.run(loaded), c.run(ours), rtol=1e-5, atol=1e-5)
    vp.save_adapter(ours, tmp_path / "default")
    assert (tmp_path / "default" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "peft" / "adapter_model.safetensors"
    ).read_bytes()


RELOAD = """
import sys, torch, visionpeft as vp
sys.path.insert(0, {tests!r})
from tiny_models import CASES
case = CASES[{case!r}]
model = vp.load_adapter(case.factory(), {adapter!r})
with torch.no_grad():
    torch.save(case.run(model), {out!r})
"""


def assert_reloads_in_a_new_process(case: str, method: str, options: dict, tmp_path: Path) -> None:
    """save_adapter -> load_adapter on a fresh model in another Python process: the same outputs."""
    c = FAMILIES[case]
    model = vp.attach(c.factory(), method, **options)
    randomize(model)
    with torch.no_grad():
        expected = c.run(model)
    vp.save_adapter(model, tmp_path / "adapter")
    script = RELOAD.format(
        tests=str(ROOT / "tests"), case=case, adapter=str(tmp_path / "adapter"), out=str(tmp_path / "out.pt")
    )
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # the child runs with torch's default thread count, the test worker with one: reductions may differ by ~1e-7
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-5, atol=1e-6)


def assert_composes(methods: list, case: str = "vit") -> None:
    """Several methods attached together train, and merge into the outputs they give together."""
    c = FAMILIES[case]
    model = vp.attach(c.factory(), methods)
    randomize(model, scale=0.05)
    with torch.no_grad():
        adapted = c.run(model)
        torch.testing.assert_close(c.run(vp.merge(model)), adapted, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(c.factory().state_dict())


def assert_training_lowers_the_loss(method: str, options: dict) -> None:
    model = vp.attach(FAMILIES["vit"].factory(), method, **options)
    losses = training_losses(model, steps=15)
    assert losses[-1] < 0.8 * losses[0]
    factors = dict(methods_of(model)[0].named_tensors())
    assert all(tensor.grad is not None for tensor in factors.values())


def assert_one_line(error: type[Exception], words: str, method: str, case: str = "vit", **options) -> None:
    """Attaching with ``options`` raises ``error`` in one line containing ``words``, and leaves the model alone."""
    model = FAMILIES[case].factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as err:
        vp.attach(model, method, **options)
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not vp.attached_methods(model)
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())
