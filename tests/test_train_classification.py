"""End-to-end classification runs on a tiny local "pretrained" ViT and tiny CIFAR-10 files read by torchvision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _classify_utils import ROOT, tiny_config, write_pretrained_vit, write_tiny_cifar10

from visionpeft.config import load_config
from visionpeft.trainers.classification import run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classify")
    data = write_tiny_cifar10(tmp / "data")
    checkpoint = write_pretrained_vit(tmp / "vit.safetensors")
    return tmp, tiny_config(tmp, checkpoint, data)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _epoch_losses(run_dir: Path) -> list[float]:
    return [r["train/epoch_loss"] for r in _records(run_dir) if "train/epoch_loss" in r]


@pytest.mark.parametrize(
    "method",
    ["method.name=vpt", "method={name: lora, r: 4, targets: [q, v]}", "method=bitfit", "method=adaptformer"],
)
def test_methods_train_and_the_loss_goes_down(setup, method):
    tmp, config_path = setup
    name = method.split("=")[1].split(",")[0].strip("{ ").replace("name: ", "")
    config = load_config(config_path, [method, f"train.run_name={name}", "optim.epochs=4"])
    results = run(config, Path(config.train.output_dir) / name, cpu=True)
    run_dir = Path(config.train.output_dir) / name
    losses = _epoch_losses(run_dir)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert results["test"]["top1"] > 0.2  # 10 classes: chance is 0.1
    for item in ("config.yaml", "last/adapter_model.safetensors", "state/progress.json", "tensorboard"):
        assert (run_dir / item).exists(), item
    assert not (run_dir / "best").exists()  # no validation split: no checkpoint is chosen on the test set


def test_resume_continues_exactly(setup):
    tmp, config_path = setup
    straight = load_config(config_path, ["train.run_name=straight", "optim.epochs=3"])
    run(straight, tmp / "runs" / "straight", cpu=True)
    split = load_config(config_path, ["train.run_name=split", "optim.epochs=3"])
    run(split, tmp / "runs" / "split", stop_after=1, cpu=True)
    assert len(_epoch_losses(tmp / "runs" / "split")) == 1
    run(split, tmp / "runs" / "split", resume=True, cpu=True)

    def steps(name):
        return [(r["step"], r["train/loss"]) for r in _records(tmp / "runs" / name) if "train/loss" in r]

    assert steps("split") == steps("straight")  # identical losses, step by step
    assert _epoch_losses(tmp / "runs" / "split") == _epoch_losses(tmp / "runs" / "straight")


def test_two_processes_match_one_with_the_same_global_batch(setup):
    tmp, config_path = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    base = [str(config_path), "optim.epochs=2", "data.batch_size=8", "optim.name=sgd", "optim.lr=0.05"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes"]
    for procs in (1, 2):
        cmd = [*launch, str(procs), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "tools" / "train.py"), *base, f"train.run_name=procs{procs}"]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
        assert result.returncode == 0, result.stderr[-2000:]
    one, two = _records(tmp / "runs" / "procs1"), _records(tmp / "runs" / "procs2")
    test_one = [r for r in one if "test/top1" in r][0]
    test_two = [r for r in two if "test/top1" in r][0]
    assert test_one["test/top1"] == test_two["test/top1"]
    assert test_one["test/loss"] == pytest.approx(test_two["test/loss"], rel=1e-3)
    assert _epoch_losses(tmp / "runs" / "procs1") == pytest.approx(_epoch_losses(tmp / "runs" / "procs2"), rel=1e-3)
