"""Model cards the hub parses, and hub upload / download (exercised against a local folder standing in for the
hub; offline they fail in one line)."""

from __future__ import annotations

import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_models import _run_vit, tiny_sd_pipeline, tiny_vit

import visionpeft as vp
from visionpeft.errors import CheckpointError


class LocalHub:
    """Stands in for the hub: uploads copy into ``root/<repo>``, downloads return that folder."""

    def __init__(self, root):
        self.root = root
        self.uploads = []

    def upload_folder(self, repo_id, folder_path, ignore_patterns, **_):
        shutil.copytree(folder_path, self.root / repo_id, ignore=shutil.ignore_patterns(*ignore_patterns))
        self.uploads.append(repo_id)
        return f"local://{repo_id}"

    def snapshot_download(self, repo_id, allow_patterns, **_):
        assert "*.safetensors" in allow_patterns
        return str(self.root / repo_id)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    import huggingface_hub

    hub = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("visionpeft.backbones.hub.hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **_: repo_id)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: hub.upload_folder(**kw))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    return hub


def _trained():
    model = vp.attach(tiny_vit(), "lora", r=2)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(0.1)
    return model


def test_push_then_load_by_repo_id(local_hub, tmp_path):
    model = _trained()
    vp.save_adapter(model, tmp_path / "out", push_to_hub="someone/tiny-lora")
    assert local_hub.uploads == ["someone/tiny-lora"]
    card = ModelCard.load(local_hub.root / "someone/tiny-lora" / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags and "visionpeft" in card.data.tags
    assert "| lora | 512 |" in card.text
    loaded = vp.load_adapter(tiny_vit(), "someone/tiny-lora")
    torch.testing.assert_close(_run_vit(loaded), _run_vit(model))


def test_a_kohya_file_is_carded_for_diffusers_with_its_weight_name(local_hub, tmp_path):
    pipe = vp.attach(tiny_sd_pipeline(tmp_path / "tok"), "lora", r=2)
    vp.save_adapter(pipe, tmp_path / "out", format="kohya", push_to_hub="someone/tiny-kohya")
    card = ModelCard.load(local_hub.root / "someone/tiny-kohya" / "README.md")
    assert card.data.library_name == "diffusers"
    assert 'pipe.load_lora_weights(FOLDER, weight_name="lora_kohya.safetensors")' in card.text


def test_offline_upload_and_download_are_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"cannot upload .* someone/x: the hub is not reachable") as info:
        vp.save_adapter(_trained(), tmp_path / "out", push_to_hub="someone/x")
    assert "\n" not in str(info.value)
    assert (tmp_path / "out" / "visionpeft_adapter.safetensors").is_file()  # nothing written is lost
    with pytest.raises(CheckpointError, match="cannot download the adapter someone/absent from the hub") as info:
        vp.load_adapter(tiny_vit(), "someone/absent")
    assert "\n" not in str(info.value)


def test_a_local_folder_named_like_a_repo_is_read_locally(tmp_path, monkeypatch):
    model = _trained()
    vp.save_adapter(model, tmp_path / "someone" / "tiny")
    monkeypatch.chdir(tmp_path)
    torch.testing.assert_close(_run_vit(vp.load_adapter(tiny_vit(), "someone/tiny")), _run_vit(model))


def test_a_lycoris_kohya_file_is_carded_for_visionpeft(local_hub, tmp_path):
    """diffusers' load_lora_weights refuses LyCORIS modules; vp.load_adapter reads them, so the card says that."""
    pipe = vp.attach(tiny_sd_pipeline(tmp_path / "tok"), "loha", r=2, target_modules=["to_q", "to_v"])
    vp.save_adapter(pipe, tmp_path / "out", format="kohya", push_to_hub="someone/tiny-loha")
    card = ModelCard.load(local_hub.root / "someone/tiny-loha" / "README.md")
    assert card.data.library_name == "visionpeft"
    assert "load_lora_weights" not in card.text and "vp.load_adapter(model, FOLDER)" in card.text
