"""Adapter folders the ecosystem reads as they are, and adapters that know which base weights they belong to."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import _run_vit, tiny_vit

import visionpeft as vp
from visionpeft.checkpoint.base_weights import frozen_weights_sha256
from visionpeft.checkpoint.folder import CONFIG_NAME, LEGACY_NAMES, WEIGHTS_NAME
from visionpeft.errors import CheckpointError


def _trained(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_default_folder_of_a_lora_is_one_peft_loads(tmp_path):
    ours = _trained(vp.attach(tiny_vit(), "lora", r=4, targets=["q", "v", "fc2"]))
    vp.save_adapter(ours, tmp_path)  # the default format
    assert {WEIGHTS_NAME, CONFIG_NAME, *LEGACY_NAMES} <= {p.name for p in tmp_path.iterdir()}
    loaded = peft.PeftModel.from_pretrained(tiny_vit(), tmp_path).eval()
    torch.testing.assert_close(_run_vit(loaded), _run_vit(ours), rtol=1e-5, atol=1e-5)
    again = vp.load_adapter(tiny_vit(), tmp_path)  # and visionpeft reads its own files from the same folder
    torch.testing.assert_close(_run_vit(again), _run_vit(ours))


def test_an_adapter_peft_cannot_hold_gets_no_peft_named_files(tmp_path):
    vp.save_adapter(_trained(vp.attach(tiny_vit(), "vpt", num_tokens=2)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME])
    with pytest.raises(ValueError):  # PEFT finds nothing of its own there, instead of misreading our schema
        peft.PeftConfig.from_pretrained(tmp_path)


def test_a_folder_written_under_the_old_names_still_loads(tmp_path):
    ours = _trained(vp.attach(tiny_vit(), "vpt", num_tokens=2))
    vp.save_adapter(ours, tmp_path)
    (tmp_path / WEIGHTS_NAME).rename(tmp_path / LEGACY_NAMES[0])
    (tmp_path / CONFIG_NAME).rename(tmp_path / LEGACY_NAMES[1])
    torch.testing.assert_close(_run_vit(vp.load_adapter(tiny_vit(), tmp_path)), _run_vit(ours))


def test_a_peft_folder_is_named_as_such(tmp_path):
    vp.save_adapter(_trained(vp.attach(tiny_vit(), "lora", r=2)), tmp_path, format="peft")
    with pytest.raises(CheckpointError, match="holds a PEFT adapter.*PeftModel.from_pretrained"):
        vp.load_adapter(tiny_vit(), tmp_path)


def test_config_records_the_base_weights(tmp_path):
    model = _trained(vp.attach(tiny_vit(), "lora", r=2))
    vp.save_adapter(model, tmp_path)
    base = json.loads((tmp_path / CONFIG_NAME).read_text())["base_model"]
    assert base["sha256"] == frozen_weights_sha256(model) and base["hashed_as"] == "float16"
    other = vp.attach(tiny_vit(seed=1), "lora", r=2)
    assert frozen_weights_sha256(other) != base["sha256"]


def test_loading_onto_other_weights_is_refused_unless_asked(tmp_path):
    vp.save_adapter(_trained(vp.attach(tiny_vit(), "lora", r=2)), tmp_path)
    other = tiny_vit(seed=1)
    reference = _run_vit(other)
    with pytest.raises(CheckpointError, match="other base weights.*check_base=False"):
        vp.load_adapter(other, tmp_path)
    assert not vp.attached_methods(other)  # left as it was given
    torch.testing.assert_close(_run_vit(other), reference)
    vp.load_adapter(other, tmp_path, check_base=False)
    assert [name for name, _ in vp.attached_methods(other)] == ["lora"]


def test_the_hash_ignores_precision_and_trained_in_place_tensors():
    model = vp.attach(tiny_vit(), "bitfit")
    reference = frozen_weights_sha256(model)
    half = vp.attach(tiny_vit().half(), "bitfit")
    assert frozen_weights_sha256(half) == reference  # same checkpoint loaded in float16
    with torch.no_grad():  # BitFit trains biases in place: they belong to the adapter, not to the base
        next(p for n, p in vp.trainable_parameters(half) if n.endswith("bias")).add_(1.0)
    half.__dict__.pop("_visionpeft_base_sha256")
    assert frozen_weights_sha256(half) == reference


def test_an_adapter_saved_before_base_hashes_loads_without_a_check(tmp_path):
    vp.save_adapter(_trained(vp.attach(tiny_vit(), "lora", r=2)), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["base_model"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    vp.load_adapter(tiny_vit(seed=1), tmp_path)


def test_legacy_peft_names_with_a_foreign_schema_are_not_ours(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / LEGACY_NAMES[0])
    (tmp_path / LEGACY_NAMES[1]).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(CheckpointError, match="PEFT adapter"):
        vp.load_adapter(tiny_vit(), tmp_path)


def test_bfloat16_weights_cannot_be_checked_and_say_so(tmp_path, caplog):
    vp.save_adapter(_trained(vp.attach(tiny_vit(), "lora", r=2)), tmp_path)
    with caplog.at_level("WARNING", logger="visionpeft.checkpoint.folder"):
        vp.load_adapter(tiny_vit(seed=1).to(torch.bfloat16), tmp_path)
    assert "cannot check the base weights" in caplog.text and "bfloat16" in caplog.text
