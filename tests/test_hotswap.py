"""vp.hotswap_adapter: another adapter's weights copied into the loaded one in place (PEFT's hotswap_adapter): the
same outputs as loading it, lower ranks and other alphas included, no recompilation of a torch.compile-d model
(torch._dynamo's counters), and refusals that leave the model as it was."""

from __future__ import annotations

import pytest
import torch
from _arithmetic_utils import lora_folder
from tiny_models import assert_same_state, tiny_vit

import visionpeft as vp
from visionpeft.errors import CheckpointError, ConfigError

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
LAYERS = ["qkv", "fc1"]


def _outputs(model):
    with torch.no_grad():
        return model(IMAGES)


def _loaded(folder):
    return vp.load_adapter(tiny_vit(), folder)


@pytest.fixture
def folders(tmp_path):
    lora_folder(tmp_path / "a", seed=1, r=4, alpha=8.0, target_modules=LAYERS)
    lora_folder(tmp_path / "b", seed=2, r=2, alpha=3.0, target_modules=LAYERS)  # lower rank, another alpha / r
    return tmp_path


def test_a_swapped_adapter_gives_the_outputs_of_loading_it(folders):
    model = _loaded(folders / "a")
    assert vp.hotswap_adapter(model, folders / "b") is model
    torch.testing.assert_close(_outputs(model), _outputs(_loaded(folders / "b")), rtol=1e-5, atol=1e-6)
    assert model.blocks[0].attn.qkv.updates["main"].lora_A.shape[0] == 4  # padded into the loaded factors
    vp.hotswap_adapter(model, folders / "a")
    torch.testing.assert_close(_outputs(model), _outputs(_loaded(folders / "a")), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the first torch.compile of a process takes ~8 s on 2 cores
def test_a_compiled_model_is_not_recompiled(folders):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _loaded(folders / "a")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    torch.testing.assert_close(_outputs(compiled), _outputs(_loaded(folders / "a")), rtol=1e-5, atol=1e-6)
    frames = counter.frame_count
    assert frames >= 1
    vp.hotswap_adapter(model, folders / "b")
    with torch._dynamo.config.patch(error_on_recompile=True):
        swapped = _outputs(compiled)
    assert counter.frame_count == frames
    torch.testing.assert_close(swapped, _outputs(_loaded(folders / "b")), rtol=1e-5, atol=1e-6)


def test_layers_the_new_adapter_lacks_are_switched_off(tmp_path, folders):
    lora_folder(tmp_path / "qkv", seed=3, r=4, alpha=4.0, target_modules=["qkv"])
    model = _loaded(folders / "a")
    vp.hotswap_adapter(model, tmp_path / "qkv")
    torch.testing.assert_close(_outputs(model), _outputs(_loaded(tmp_path / "qkv")), rtol=1e-5, atol=1e-6)
    assert not model.blocks[0].mlp.fc1.updates["main"].lora_B.any()


def test_dora_magnitudes_and_heads_are_swapped_too(tmp_path):
    lora_folder(tmp_path / "d1", seed=1, r=2, use_dora=True, targets=["q", "v"])
    other = lora_folder(tmp_path / "d2", seed=2, r=2, alpha=2.0, use_dora=True, targets=["q", "v"])
    with torch.no_grad():
        other.head.weight.mul_(-1)
        other.blocks[0].attn.qkv.updates["q"].magnitude.mul_(1.5)
    vp.save_adapter(other, tmp_path / "d2")
    model = _loaded(tmp_path / "d1")
    vp.hotswap_adapter(model, tmp_path / "d2")
    torch.testing.assert_close(_outputs(model), _outputs(_loaded(tmp_path / "d2")), rtol=1e-5, atol=1e-6)


def test_refusals_are_one_line_and_change_nothing(tmp_path, folders):
    lora_folder(tmp_path / "wide", seed=3, r=8, target_modules=LAYERS)
    lora_folder(tmp_path / "more", seed=3, r=4, target_modules=["qkv", "fc1", "fc2"])
    lora_folder(tmp_path / "dora", seed=3, r=4, target_modules=LAYERS, use_dora=True)
    lora_folder(tmp_path / "other_base", seed=3, r=4, target_modules=LAYERS, factory=lambda: tiny_vit(seed=5))
    vp.save_adapter(vp.attach(tiny_vit(), "vpt", num_tokens=2), tmp_path / "vpt")
    model = _loaded(folders / "a")
    reference = _loaded(folders / "a")
    cases = [
        ("pads lower ranks only", tmp_path / "wide"),
        ("tensors the loaded adapter lacks", tmp_path / "more"),
        ("use_dora=True", tmp_path / "dora"),
        ("other base weights", tmp_path / "other_base"),
        ("hotswap needs the same methods", tmp_path / "vpt"),
    ]
    for message, folder in cases:
        with pytest.raises(CheckpointError, match=message) as err:
            vp.hotswap_adapter(model, folder)
        assert "\n" not in str(err.value)
        assert_same_state(model, reference)
    vp.hotswap_adapter(model, tmp_path / "other_base", check_base=False)
    with pytest.raises(ConfigError, match="no visionpeft method"):
        vp.hotswap_adapter(tiny_vit(), folders / "a")


def test_a_lora_attached_at_the_largest_rank_takes_every_adapter(folders):
    """diffusers' enable_lora_hotswap(target_rank=...): attach the LoRA at the largest rank first (its zero B changes
    nothing), then swap adapters of any lower rank in."""
    model = vp.attach(tiny_vit(), "lora", r=8, target_modules=LAYERS)
    torch.testing.assert_close(_outputs(model), _outputs(tiny_vit()), rtol=0, atol=0)
    for name in "ab":
        vp.hotswap_adapter(model, folders / name)
        torch.testing.assert_close(_outputs(model), _outputs(_loaded(folders / name)), rtol=1e-5, atol=1e-6)
