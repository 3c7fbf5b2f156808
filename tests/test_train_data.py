"""Data for classification: torchvision CIFAR on written files, VTAB-1k list files, ImageFolder, the recipes'
transforms, a VTAB run evaluated again by tools/eval.py, and instant one-line failures when things are missing."""

from __future__ import annotations

import importlib
import json
import time

import pytest
import torch
from _classify_utils import tiny_config, write_pretrained_vit, write_tiny_cifar10, write_tiny_vtab
from PIL import Image

from visionpeft.cli.common import run as run_cli  # noqa: E402
from visionpeft.config import load_config
from visionpeft.errors import DataError, ModelLoadError
from visionpeft.registry import DATASETS
from visionpeft.trainers.classification import run


def test_cifar10_files_are_read_by_torchvision(tmp_path):
    root = write_tiny_cifar10(tmp_path, train_per_class=10, test_per_class=3)
    train, test = DATASETS.get("cifar10")("train", root=str(root)), DATASETS.get("cifar10")("test", root=str(root))
    assert len(train) == 100 and len(test) == 30
    assert train.classes[:2] == ["airplane", "automobile"]
    image, label = train[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32) and 0 <= label < 10
    with pytest.raises(DataError, match="splits train and test, not 'val'"):
        DATASETS.get("cifar10")("val", root=str(root))


def test_vtab_lists_and_their_errors(tmp_path):
    root = write_tiny_vtab(tmp_path, "eurosat", 10, train_per_class=2, test_per_class=1)
    build = DATASETS.get("vtab-eurosat")
    sizes = {split: len(build(split, root=str(root))) for split in ("train800", "val200", "train800val200", "test")}
    assert sizes == {"train800": 20, "val200": 10, "train800val200": 30, "test": 10}
    dataset = build("test", root=str(root))
    assert dataset.classes == [str(i) for i in range(10)] and dataset[3][1] == 3
    with pytest.raises(DataError, match="VTAB-1k splits are train800, val200, train800val200, test, not 'train'"):
        build("train", root=str(root))
    with pytest.raises(DataError, match="vtab-eurosat needs data.root"):
        build("test")
    with pytest.raises(DataError, match=r"dtd/test.txt does not exist; see datasets/vtab.md"):
        DATASETS.get("vtab-dtd")("test", root=str(root))
    (root / "eurosat" / "test.txt").write_text("images/a.png 3\nimages/b.png 12\n")
    with pytest.raises(DataError, match="label 12 outside 0..9"):
        build("test", root=str(root))
    (root / "eurosat" / "test.txt").write_text("images/a.png\n")
    with pytest.raises(DataError, match="test.txt:1 is not '<image path> <label>'"):
        build("test", root=str(root))


def test_imagefolder_classes_follow_folder_names(tmp_path):
    for cls, colour in (("zebra", 10), ("ant", 200)):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (20, 20), (colour, 0, 0)).save(tmp_path / "train" / cls / "0.png")
    dataset = DATASETS.get("imagefolder")("train", root=str(tmp_path))
    assert dataset.classes == ["ant", "zebra"] and sorted(label for _, label in dataset) == [0, 1]
    with pytest.raises(DataError, match="image folder split .*test does not exist"):
        DATASETS.get("imagefolder")("test", root=str(tmp_path))


def test_transforms_resize_without_augmentation_and_use_the_model_normalisation():
    import timm

    from visionpeft.data import transforms as T

    model = timm.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=False, depth=1)
    data = T.data_config_of(model)
    assert data.mean == data.std == (0.5, 0.5, 0.5)  # timm's pretrained_cfg of the in21k ViTs
    transform = T.build_transform(224, data, train=True, augment="none")
    image = Image.new("RGB", (50, 30), (255, 0, 0))
    first, second = transform(image), transform(image)
    assert first.shape == (3, 224, 224) and torch.equal(first, second)  # VTAB protocol: deterministic resize
    assert first[0].max() == pytest.approx(1.0) and first[1].min() == pytest.approx(-1.0)
    crop = T.build_transform(32, data, train=True, augment="crop_flip")(image)
    assert crop.shape == (3, 32, 32)


def test_test_time_crop_and_interpolation_follow_the_models_data_config():
    import timm
    from torchvision.transforms import v2

    from visionpeft.data import transforms as T

    model = timm.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=False, depth=1)
    data = T.data_config_of(model)
    assert (data.crop_pct, data.interpolation) == (0.9, "bicubic")  # augreg's pretrained_cfg, not a fixed 0.875
    resize = next(
        t for t in T.build_transform(224, data, train=False, augment="crop_flip").transforms if isinstance(t, v2.Resize)
    )
    assert resize.size == [248] and resize.interpolation == v2.InterpolationMode.BICUBIC
    clip = T.data_config_of(timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, depth=1))
    assert clip.mean == (0.48145466, 0.4578275, 0.40821073)  # CLIP statistics from timm's pretrained_cfg


def test_vtab_run_selects_best_on_val_and_eval_tool_reproduces_the_test_accuracy(tmp_path, capsys):
    root = write_tiny_vtab(tmp_path / "vtab", "eurosat", 10)
    config_path = tiny_config(tmp_path, write_pretrained_vit(tmp_path / "vit.safetensors"), root)
    overrides = [
        "data.name=vtab-eurosat",
        "data.train_split=train800",
        "data.val_split=val200",
        "optim.epochs=3",
        "train.run_name=eurosat",
    ]
    config = load_config(config_path, overrides)
    run_dir = tmp_path / "runs" / "eurosat"
    results = run(config, run_dir, cpu=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r["eval/top1"] for r in records if "eval/top1" in r]
    assert len(val) == 3 and (run_dir / "best" / "visionpeft_adapter.safetensors").is_file()
    test = [r for r in records if "test/top1" in r]
    assert len(test) == 1 and test[0]["test/top1"] == results["test"]["top1"]
    capsys.readouterr()

    eval_tool = importlib.import_module("eval")
    assert run_cli(eval_tool.main, [str(run_dir)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{run_dir} [best] test: top1 {100 * results['test']['top1']:.2f}%"), line
    assert run_cli(eval_tool.main, [str(run_dir), "--checkpoint", "last", "--split", "val200"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{run_dir} [last] val200: top1 {100 * val[-1]:.2f}%"), line
    assert run_cli(eval_tool.main, [str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'nowhere'} does not exist; eval takes a run folder (config.yaml + saved adapters)"
    )


def test_missing_pretrained_weights_fail_at_once_with_the_way_out(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from visionpeft.backbones import hub
    from visionpeft.backbones.factory import create_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    hub.hub_reachable.cache_clear()
    try:
        config = load_config(None, ["model.name=vit_tiny_patch16_224.augreg_in21k", "model.kwargs={depth: 1}"])
        start = time.perf_counter()
        with pytest.raises(ModelLoadError) as info:
            create_model(config.model, num_classes=10)
        assert time.perf_counter() - start < 10
    finally:
        hub.hub_reachable.cache_clear()
    message = str(info.value)
    assert "could not fetch pretrained weights for 'vit_tiny_patch16_224.augreg_in21k'" in message
    assert "model.checkpoint=/path/to/weights.safetensors" in message and "\n" not in message
