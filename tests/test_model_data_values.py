"""Model and data values that used to reach timm / torch unchecked are one line before training (`--dry-run`)."""

from __future__ import annotations

import pytest
import train as train_tool  # noqa: E402
from _classify_utils import ROOT, tiny_config, write_pretrained_vit, write_tiny_cifar10
from PIL import Image
from tiny_models import tiny_clip

from visionpeft.backbones.factory import fixed_input_size
from visionpeft.cli.common import run  # noqa: E402
from visionpeft.data.fewshot import base_new_split
from visionpeft.errors import DataError
from visionpeft.tasks.clip_classifier import CLIPClassifier


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experiment")
    return tiny_config(tmp, write_pretrained_vit(tmp / "vit.safetensors"), write_tiny_cifar10(tmp / "data"))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_unknown_timm_kwarg_is_named_with_a_suggestion(config, capsys):
    assert run(train_tool.main, [str(config), "model.kwargs.embed_dimm=32", "--dry-run"]) == 2
    assert _one_line(capsys) == (
        "error: model.kwargs.embed_dimm is not an argument of timm model 'vit_tiny_patch16_224' (did you mean "
        "'embed_dim'?)"
    )


def test_unknown_timm_kwarg_is_not_reported_as_a_download_failure(config, capsys):
    """With pretrained weights asked for, the same mistake is still named (not "could not fetch weights")."""
    args = [str(config), "model.checkpoint=null", "model.pretrained=true", "model.kwargs.embed_dimm=32", "--dry-run"]
    assert run(train_tool.main, args) == 2
    assert "model.kwargs.embed_dimm is not an argument" in _one_line(capsys)


def test_image_size_that_the_model_cannot_take_names_both_sizes_and_the_fix(config, capsys):
    assert run(train_tool.main, [str(config), "data.img_size=48", "--dry-run"]) == 2
    assert _one_line(capsys) == (
        "error: data.img_size=48 does not fit model 'vit_tiny_patch16_224', built for 32x32 px inputs; set "
        "model.img_size=48 (timm resizes the position embeddings) or model.kwargs.dynamic_img_size=true"
    )
    for fix in ("model.img_size=48", "model.kwargs.dynamic_img_size=true"):
        assert run(train_tool.main, [str(config), "data.img_size=48", fix, "--dry-run"]) == 0


def test_fixed_input_size_of_an_open_clip_classifier():
    assert fixed_input_size(CLIPClassifier(tiny_clip(), ["a", "b"])) == (32, 32)


def _image_tree(root, classes):
    for split in ("train", "test"):
        for i, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(folder / "0.png")
    return root


def test_a_single_class_dataset_is_refused_before_training(config, tmp_path, capsys):
    data = _image_tree(tmp_path / "imgs", ["only"])
    assert run(train_tool.main, [str(config), "data.name=imagefolder", f"data.root={data}", "--dry-run"]) == 2
    assert _one_line(capsys) == (
        "error: dataset 'imagefolder' split 'train' has 1 class (only); classification needs at least 2"
    )


def test_a_class_split_that_leaves_one_class_is_refused(config, tmp_path, capsys):
    data = _image_tree(tmp_path / "imgs", ["a", "b"])
    args = [str(config), "data.name=imagefolder", f"data.root={data}", "data.class_split=new", "--dry-run"]
    assert run(train_tool.main, args) == 2
    assert "has 1 class (b); classification needs at least 2" in _one_line(capsys)


def test_base_to_new_split_needs_two_classes(tmp_path):
    class One:
        classes = ["a"]
        targets = [0, 0]

    with pytest.raises(DataError, match="the base-to-new class split needs at least 2 classes; the dataset has 1"):
        base_new_split(One(), "base")


FP16_ON_CPU = "train.mixed_precision=fp16 needs a GPU; this run is on the CPU, so it trains in fp32 instead"


def test_fp16_on_a_cpu_trains_a_classifier_in_fp32_with_one_warning(config, capsys):
    """`train.mixed_precision=fp16` on a machine without a GPU (or with `--cpu`): one rule for every task, the run
    trains in fp32 and says so in one warning line (a classifier trained in fp32 without a word before)."""
    args = [str(config), "train.mixed_precision=fp16", "optim.epochs=1", "train.run_name=fp16", "--cpu"]
    assert run(train_tool.main, args) == 0
    assert capsys.readouterr().out.count(FP16_ON_CPU) == 1


@pytest.mark.slow
def test_fp16_on_a_cpu_trains_a_controlnet_in_fp32_with_one_warning(tmp_path, capsys):
    """`train.mixed_precision=fp16` for a control run on the CPU (the shipped SD 1.5 configs ask for it): fp32 with
    the same warning; before, the frozen U-Net was cast to fp16 and the first step crashed with "mat1 and mat2 must
    have the same dtype, but got Float and Half"."""
    from tiny_models import tiny_sd_pipeline

    from visionpeft.data.fill50k import make_fill50k

    tiny_sd_pipeline(tmp_path / "tok").save_pretrained(tmp_path / "pipe")
    make_fill50k(tmp_path / "fill", n=2, size=16, seed=0)
    args = [
        str(ROOT / "configs" / "control" / "controlnet_tiny_sd_fill.yaml"),
        f"model.name={tmp_path / 'pipe'}",
        f"data.root={tmp_path / 'fill'}",
        "data.size=16",
        "data.batch_size=2",
        "optim.steps=2",
        "train.mixed_precision=fp16",
        "train.eval_every=2",
        "train.validation_pairs=1",
        "train.validation_steps=1",
        f"train.output_dir={tmp_path / 'runs'}",
        "--cpu",
    ]
    assert run(train_tool.main, args) == 0
    assert capsys.readouterr().out.count(FP16_ON_CPU) == 1


def test_offline_every_missing_input_is_named_in_one_message_with_the_offline_demo(
    config, tmp_path, monkeypatch, capsys
):
    """Offline, a config whose data and pretrained weights are both absent: one message naming both (before, one
    per run: the data, then the weights) and the offline demo of the same method, at once (the hub is found
    unreachable without waiting); with the data there, the weights alone, with the same pointer."""
    import time

    from huggingface_hub import constants

    from visionpeft.backbones import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    hub.hub_reachable.cache_clear()
    weights = ["model.checkpoint=null", "model.pretrained=true", "model.name=vit_tiny_patch16_224.augreg_in21k"]
    demo = "configs/demo/vpt_tiny_digits.yaml runs offline"  # "Without downloads, python tools/train.py <it> ..."
    try:
        start = time.perf_counter()
        assert run(train_tool.main, [str(config), *weights, f"data.root={tmp_path / 'nowhere'}", "--dry-run"]) == 2
        both = _one_line(capsys)
        assert run(train_tool.main, [str(config), *weights, "--dry-run"]) == 2
        alone = _one_line(capsys)
        assert time.perf_counter() - start < 60
    finally:
        hub.hub_reachable.cache_clear()
    assert both.startswith(
        f"error: 2 inputs of this config are missing: (1) cifar10 not found under {tmp_path / 'nowhere'} (expected "
        "cifar-10-batches-py/)"
    )
    fetch = "could not fetch pretrained weights for 'vit_tiny_patch16_224.augreg_in21k' (no network"
    assert f"; (2) {fetch}" in both and both.endswith(demo)
    assert alone.startswith(f"error: {fetch}") and alone.endswith(demo)
