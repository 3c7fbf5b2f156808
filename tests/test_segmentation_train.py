"""The segmentation trainer on the texture mosaic: a short run learns, the run folder holds its outputs, eval /
predict reuse it, and bad input is one line before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from visionpeft.checkpoint.folder import CONFIG_NAME
from visionpeft.cli.common import run as run_cli
from visionpeft.cli.eval import main as eval_main
from visionpeft.cli.predict import main as predict_main
from visionpeft.cli.train import main as train_main
from visionpeft.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "segmentation" / "lora_tiny_mosaic.yaml"
# 32 px mosaics (the tiny ViT's own size: 8 x 8 patches), 64 images per split: a run of seconds
SMALL = [
    "data.options={size: 32, n: 128}",
    "model.img_size=32",
    "data.crop_size=[32,32]",
    "data.scale=[32,32]",
    "eval.crop=[32,32]",
    "eval.stride=[21,21]",
    "data.batch_size=8",
    "data.eval_batch_size=64",
    "optim.steps=40",
    "optim.warmup_steps=2",
    "optim.lr=0.01",
    "train.eval_every=40",
    "train.log_every=5",
    "eval.grid_images=2",
]


def small_config(tmp: Path, *extra: str):
    return load_config(CONFIG, [*SMALL, f"train.output_dir={tmp}", "train.run_name=run", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from visionpeft.trainers.segmentation import run

    tmp = tmp_path_factory.mktemp("seg")
    results = run(small_config(tmp), tmp / "run")
    return tmp / "run", results


@pytest.mark.slow
def test_a_short_run_lowers_the_loss_and_beats_chance_widely(trained):
    run_dir, results = trained
    losses = [
        r["train/loss"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "train/loss" in r
    ]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:2]) / 2
    test = results["test"]
    assert test["aAcc"] > 40 and test["mIoU"] > 20  # chance: 1 / 6 of the pixels (16.7 %)
    assert set(results["parameters"]["by_group"]) == {"lora", "head"}


def test_the_run_folder_holds_the_table_the_grid_and_the_labels(trained):
    run_dir, results = trained
    table = (run_dir / "per_class_iou.md").read_text()
    assert all(name in table for name in ("brick", "grass", "stars"))
    grid = Image.open(run_dir / "predictions.png")
    # 2 rows of image | truth | prediction, 32 px tiles enlarged to 128, and the legend (6 classes) at the right
    assert grid.width > 3 * 128 and grid.height == 2 * 128
    legend = grid.crop((3 * 128, 0, grid.width, grid.height))
    assert len({c for _, c in legend.getcolors(4096)}) > 6  # the six class colours, black text, white
    task = json.loads((run_dir / "last" / CONFIG_NAME).read_text())["task"]
    assert task["id2label"]["0"] == "brick" and len(task["palette"]) == 6
    assert any((run_dir / "tensorboard").iterdir())
    assert {str(run_dir / "per_class_iou.md"), str(run_dir / "predictions.png")} <= {str(p) for p in results["outputs"]}


@pytest.mark.slow
def test_eval_reproduces_the_runs_numbers_and_predict_writes_masks(trained, tmp_path, capsys):
    run_dir, results = trained
    assert run_cli(eval_main, [str(run_dir), "--cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "| brick |" in out[2] and out[-2].startswith("| aAcc |")  # the table, then the summary on its own line
    assert out[-1] == f"{run_dir} [last] test (whole): " + ", ".join(
        f"{k} {results['test'][k]:.2f}%" for k in ("mIoU", "aAcc", "mAcc")
    )
    from visionpeft.data.segmentation import build_segmentation_dataset

    image = build_segmentation_dataset("texture-mosaic", "test", n=1, size=40)[0][0]
    image.save(tmp_path / "photo.png")
    assert run_cli(predict_main, [str(run_dir), str(tmp_path / "photo.png"), "--out", str(tmp_path / "m")]) == 0
    labels = Image.open(tmp_path / "m" / "photo_labels.png")
    assert labels.mode == "L" and labels.size == (40, 40) and max(labels.getdata()) < 6
    assert Image.open(tmp_path / "m" / "photo_color.png").mode == "RGB"
    assert Image.open(tmp_path / "m" / "legend.png").height >= 6 * 16  # one row per class
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    assert run_cli(predict_main, [str(run_dir), str(tmp_path / "broken.jpg"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'broken.jpg'} is not a readable image (UnidentifiedImageError)"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["head.num_classes=5"], "num_classes is 5 but texture-mosaic has 6 classes"),
        (["eval.stride=[21]"], "eval.stride must be two positive numbers"),
        (["model.kwargs.dynamic_img_size=false", "model.img_size=64"], "does not fit model 'vit_tiny_patch16_224'"),
        (["head.name=linear", "head.aux=true"], "auxiliary heads belong to setr_pup"),
    ],
)
def test_bad_input_is_one_line_before_training(tmp_path, capsys, overrides, message):
    argv = [str(CONFIG), *SMALL, f"train.output_dir={tmp_path}", "train.run_name=bad", *overrides]
    assert run_cli(train_main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "bad").exists()


def test_the_head_learning_rate_multiplier_gets_its_own_groups(tmp_path):
    from visionpeft.trainers.run import build_optimizer
    from visionpeft.trainers.segmentation import build_experiment

    config = small_config(tmp_path, "head.name=setr_pup", "head.aux=true", "head.channels=8", "optim.head_lr_mult=10")
    seg = build_experiment(config).model
    opt = build_optimizer(config.optim, seg, 16, {"head.": 10.0, "aux_head.": 10.0})
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert {lrs[id(p)] for p in seg.head.parameters()} == {0.1}
    assert {lrs[id(p)] for p in seg.aux_head.parameters()} == {0.1}
    lora = [p for n, p in seg.named_parameters() if "lora" in n]
    assert lora and {lrs[id(p)] for p in lora} == {0.01}
    seg.train()
    logits, aux = seg(torch.randn(2, 3, 32, 32), with_aux=True)
    assert logits.shape == (2, 6, 32, 32) and len(aux) == 3


def test_the_config_lists_the_heads_the_segmenter_has():
    from visionpeft.config.segmentation import HEAD_NAMES
    from visionpeft.tasks.seg_heads import HEADS

    assert HEAD_NAMES == HEADS
