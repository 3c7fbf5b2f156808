"""The model-library table (``visionpeft/backbones/libraries.py``): every entry builds, names and reads its models;
``model.library``'s choices are the table's image libraries; what differs between libraries is asked of the table."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_clip, tiny_clip_timm, tiny_unet, tiny_vit

import visionpeft as vp
from visionpeft.backbones.base import Backbone
from visionpeft.backbones.factory import create_model, data_config, fixed_input_size, library_of, model_source
from visionpeft.backbones.libraries import CLASSIFIER_KINDS, IMAGE_LIBRARIES, LIBRARIES, DataConfig, library
from visionpeft.config import load_config
from visionpeft.config.sections import VisionModel
from visionpeft.errors import ConfigError
from visionpeft.tasks.classifier import CLASSIFIERS, LogitsClassifier, create_classifier
from visionpeft.tasks.clip_classifier import CLIPClassifier

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)


def test_the_table_holds_every_library_with_what_it_must_know():
    assert list(LIBRARIES) == ["timm", "open_clip", "transformers", "diffusers", "generic"]
    for name, entry in LIBRARIES.items():
        assert entry.name == name
        adapter_file = entry.adapter_file()
        assert adapter_file.__name__.startswith("visionpeft.backbones.")
        for function in ("create", "data_config", "fixed_input_size"):
            assert callable(getattr(adapter_file, function)), (name, function)
        assert all(issubclass(cls, Backbone) for cls in entry.backbone_classes())
        assert entry.hub_source.format(name="n", tag="t")
        assert entry.classifier is None or (entry.classifier in CLASSIFIER_KINDS and entry.classifier in CLASSIFIERS)
    assert LIBRARIES["generic"].backbone_classes()[-1].matches(torch.nn.Identity())  # the last family takes any module


def test_model_library_choices_are_the_tables_image_libraries():
    field = next(f for f in dataclasses.fields(VisionModel) if f.name == "library")
    assert field.metadata["choices"] == IMAGE_LIBRARIES == ("timm", "open_clip", "transformers", "generic")
    assert all(LIBRARIES[name].classifier is not None for name in IMAGE_LIBRARIES)


def test_a_wrong_library_is_one_line_with_the_closest_name():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.library=open-clip"])
    assert str(info.value) == (
        "config key 'model.library' must be one of timm, open_clip, transformers, generic, got 'open-clip' "
        "(did you mean 'open_clip'?)"
    )
    with pytest.raises(ConfigError, match=r"^unknown model library 'timmm' \(did you mean 'timm'\?\); one of timm, "):
        library("timmm")


def test_a_library_that_builds_no_image_model_makes_no_classifier():
    cfg = SimpleNamespace(library="diffusers", name="a/pipeline")  # past the config's choices, as the API allows
    with pytest.raises(ConfigError, match="^model.library=diffusers builds no image classifier$"):
        create_classifier(cfg, 2, ["a", "b"])


def test_models_are_recognised_by_their_library():
    cases = {
        "timm": tiny_vit(),
        "open_clip": CLIPClassifier(tiny_clip(), ["a", "b"]),  # a task model: its library model's library
        "diffusers": tiny_unet(),
        "generic": torch.nn.Linear(2, 2),
    }
    for name, model in cases.items():
        assert library_of(model).name == name


def test_data_configs_keep_their_numbers():
    """The same normalisation, crop and interpolation as before the table (timm's in21k / augreg values are
    checked in test_train_data)."""
    clip = data_config(CLIPClassifier(tiny_clip(), ["a", "b"]))
    assert clip == DataConfig(OPENAI_MEAN, (0.26862954, 0.26130258, 0.27577711), 1.0, "bicubic")
    assert data_config(tiny_vit()) == DataConfig()  # a timm class called directly has no pretrained_cfg
    assert data_config(torch.nn.Linear(2, 2)) == DataConfig()
    assert data_config(tiny_unet()) == DataConfig((0.5,) * 3, (0.5,) * 3, 1.0, "bilinear")  # the VAE's [-1, 1]


def test_fixed_input_sizes_come_from_the_library_model():
    assert fixed_input_size(tiny_vit()) == (32, 32)
    assert fixed_input_size(tiny_vit(dynamic_img_size=True)) is None
    assert fixed_input_size(CLIPClassifier(tiny_clip(), ["a", "b"])) == (32, 32)
    assert fixed_input_size(tiny_clip_timm()) == (224, 224)  # open_clip's timm trunk
    assert fixed_input_size(torch.nn.Linear(2, 2)) is None


def test_sources_name_the_weights_as_each_library_spells_them(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.touch()
    base = ["model.pretrained=true"]
    assert model_source(load_config(None, [*base, "model.name=vit_t.tag"]).model) == "timm/vit_t.tag"
    clip = [*base, "model.library=open_clip", "model.name=ViT-B-32", "model.pretrained_tag=openai"]
    assert model_source(load_config(None, clip).model) == "ViT-B-32/openai"
    assert model_source(load_config(None, [*base, "model.library=transformers", "model.name=a/b"]).model) == "a/b"
    assert model_source(load_config(None, ["model.name=x", "model.pretrained=false"]).model) == "x (random init)"
    assert model_source(load_config(None, [f"model.checkpoint={weights}"]).model) == str(weights.resolve())


def test_a_generic_model_comes_from_a_callable_and_trains_by_module_path():
    cfg = load_config(None, ["model.library=generic", "model.name=torchvision.models:resnet18"]).model
    model = create_classifier(cfg, 3, ["a", "b", "c"]).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    assert model.__dict__["_visionpeft_source"] == "torchvision.models:resnet18"
    vp.attach(model, "lora", r=2, target_modules=["layer4.1.conv2"], modules_to_save=["fc"])
    assert vp.count_parameters(model)["by_group"] == {"lora": 2 * 512 * 9 + 512 * 2, "fc": 512 * 3 + 3}  # a 3x3 conv
    for name, message in {
        "torchvision.models.resnet18": "must name a callable as package.module:function",
        "torchvision.models:resnet1": "cannot be imported: module 'torchvision.models' has no attribute 'resnet1'",
        "no_such_package_x:f": "cannot be imported: No module named 'no_such_package_x'",
    }.items():
        bad = load_config(None, ["model.library=generic", f"model.name={name}"]).model
        with pytest.raises(ConfigError, match=message):
            create_model(bad, 3)


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    """A tiny transformers ViT classifier and its image processor, written by save_pretrained."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("hf-vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    ViTForImageClassification(config).save_pretrained(folder)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4] * 3, image_std=[0.3] * 3)
    processor.save_pretrained(folder)
    return folder


def test_a_transformers_classifier_hands_on_its_logits_and_reads_images_as_its_processor(vit_folder):
    cfg = load_config(None, ["model.library=transformers", f"model.name={vit_folder}"]).model
    model = create_classifier(cfg, 3, ["a", "b", "c"]).eval()
    assert isinstance(model, LogitsClassifier)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert data_config(model) == DataConfig((0.4,) * 3, (0.3,) * 3, 1.0, "bilinear")
    assert library_of(model).name == "transformers"
    vp.attach(model, "lora", r=2, target_modules=["q_proj", "v_proj"])
    assert vp.count_parameters(model)["by_group"]["head"] == 32 * 3 + 3  # the library's classifier trains


def test_a_transformers_model_that_cannot_be_found_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, ["model.library=transformers", f"model.name={tmp_path / 'nothing-here'}"]).model
    with pytest.raises(vp.errors.ModelLoadError, match="could not load transformers model") as info:
        create_model(cfg, 3)
    assert "\n" not in str(info.value)
