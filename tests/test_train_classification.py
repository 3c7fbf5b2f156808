"""End-to-end classification runs on a tiny local "pretrained" ViT and tiny CIFAR-10 files read by torchvision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _classify_utils import ROOT, tiny_config, write_pretrained_vit, write_tiny_cifar10
from safetensors.torch import load_file

import visionpeft as vp
from visionpeft.config import load_config
from visionpeft.errors import ConfigError
from visionpeft.trainers import classification
from visionpeft.trainers import run as run_module
from visionpeft.trainers.classification import run
from visionpeft.trainers.loop import Loop


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classify")
    data = write_tiny_cifar10(tmp / "data")
    checkpoint = write_pretrained_vit(tmp / "vit.safetensors")
    return tmp, tiny_config(tmp, checkpoint, data)


@pytest.fixture
def captured(monkeypatch):
    """What a run builds (experiment, optimizer) and, per training forward, the modes of a frozen block and the head."""
    seen: dict = {"modes": []}
    build_experiment, build_optimizer = classification.build_experiment, run_module.build_optimizer

    def record(module, args):
        if torch.is_grad_enabled():  # training forwards only
            model = seen["exp"].model
            seen["modes"].append((model.blocks[0].attn.training, model.head.training))

    def build_and_watch(config):
        seen["exp"] = build_experiment(config)
        seen["exp"].model.blocks[0].register_forward_pre_hook(record)
        return seen["exp"]

    monkeypatch.setattr(classification, "build_experiment", build_and_watch)
    monkeypatch.setattr(run_module, "build_optimizer", lambda *a: seen.setdefault("opt", build_optimizer(*a)))
    return seen


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
    for item in ("config.yaml", "last/visionpeft_adapter.safetensors", "state/progress.json", "tensorboard"):
        assert (run_dir / item).exists(), item
    assert not (run_dir / "best").exists()  # no validation split: no checkpoint is chosen on the test set


def _tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


@pytest.mark.slow
def test_resume_continues_exactly(setup, monkeypatch):
    """Stopped after epoch 1, crashed while saving epoch 2, resumed twice: the same run as an uninterrupted one."""
    tmp, config_path = setup
    straight = load_config(config_path, ["train.run_name=straight", "optim.epochs=3"])
    run(straight, tmp / "runs" / "straight", cpu=True)
    split = load_config(config_path, ["train.run_name=split", "optim.epochs=3"])
    run(split, tmp / "runs" / "split", stop_after=1, cpu=True)
    assert len(_epoch_losses(tmp / "runs" / "split")) == 1

    save_state = Loop.save_state

    def crash(self):
        raise KeyboardInterrupt  # after epoch 2 was logged, before its state exists

    monkeypatch.setattr(Loop, "save_state", crash)
    time.sleep(1.1)  # TensorBoard orders event files by their name, whose time stamp counts whole seconds
    with pytest.raises(KeyboardInterrupt):
        run(split, tmp / "runs" / "split", resume=True, cpu=True)
    assert len(_epoch_losses(tmp / "runs" / "split")) == 2
    monkeypatch.setattr(Loop, "save_state", save_state)
    time.sleep(1.1)
    run(split, tmp / "runs" / "split", resume=True, cpu=True)

    def steps(name):
        return [(r["step"], r["train/loss"]) for r in _records(tmp / "runs" / name) if "train/loss" in r]

    assert steps("split") == steps("straight")  # identical losses, step by step
    assert _epoch_losses(tmp / "runs" / "split") == _epoch_losses(tmp / "runs" / "straight")
    for tag in ("train/loss", "train/epoch_loss"):  # the crashed epoch's TensorBoard events were purged
        assert _tensorboard_steps(tmp / "runs" / "split", tag) == _tensorboard_steps(tmp / "runs" / "straight", tag)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch_and_resume_exactly(setup):
    """accelerate launch with 2 CPU processes (gloo) and gradient accumulation (several optimizer steps per epoch): the
    same epoch losses and test result as 1 process; a 2-process run stopped after an epoch and resumed in 2
    processes repeats the uninterrupted 2-process run exactly."""
    tmp, config_path = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # 50 training images in global batches of 10: no padded last batch (accelerate would repeat samples to even
    # out the processes' shares, and the runs would differ by those); 1 process: micro-batches of 2, 2: of 1 each
    base = [
        str(config_path),
        "optim.epochs=2",
        "data.batch_size=10",
        "optim.grad_accum=5",
        "optim.name=sgd",
        "optim.lr=0.05",
    ]

    def launch(procs, *args):
        # --multi_gpu: accelerate's torch.distributed.run launcher, gloo CPU processes here (--cpu starts only one)
        from visionpeft.sweep.runs import free_port

        # a port of its own: another test may launch processes at the same time (pytest-xdist)
        mode = ["--multi_gpu", "--main_process_port", str(free_port())] if procs > 1 else ["--cpu"]
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *mode,
            "--num_processes",
            str(procs),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(ROOT / "tools" / "train.py"),
            *args,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert result.returncode == 0, "\n".join(errors[:20]) + result.stderr[-1000:]

    for procs in (1, 2):
        launch(procs, *base, f"train.run_name=procs{procs}")
    # each process's random state is in the committed state (the main process waits for the other's file)
    assert sorted(p.name for p in (tmp / "runs" / "procs2" / "state").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    launch(2, *base, "train.run_name=procs2split", "--stop-after", "1")
    launch(2, "--resume", str(tmp / "runs" / "procs2split"))
    one, two = _records(tmp / "runs" / "procs1"), _records(tmp / "runs" / "procs2")
    assert [r["step"] for r in one if "train/epoch_loss" in r] == [5, 10]  # 25 micro-batches of 2: 5 steps / epoch
    assert [r["step"] for r in two if "train/loss" in r] == list(range(1, 11))  # one process logged, once per step
    test_one = [r for r in one if "test/top1" in r][0]
    test_two = [r for r in two if "test/top1" in r][0]
    assert test_one["test/top1"] == test_two["test/top1"]
    assert test_one["test/loss"] == pytest.approx(test_two["test/loss"], rel=1e-3)
    assert _epoch_losses(tmp / "runs" / "procs1") == pytest.approx(_epoch_losses(tmp / "runs" / "procs2"), rel=1e-3)
    split = _records(tmp / "runs" / "procs2split")
    assert [(r["step"], r["train/loss"]) for r in split if "train/loss" in r] == [
        (r["step"], r["train/loss"]) for r in two if "train/loss" in r
    ]
    assert [r for r in split if "test/top1" in r][0]["test/top1"] == test_two["test/top1"]
    # the same command again: the main process picks the numbered folder and the other follows it
    launch(2, *base, "train.run_name=procs2", "optim.epochs=1")
    assert [r["step"] for r in _records(tmp / "runs" / "procs2-2") if "train/loss" in r] == list(range(1, 6))
    assert not (tmp / "runs" / "procs2-3").exists()


def test_only_method_and_head_train_and_vpt_keeps_the_backbone_in_eval_mode(setup, captured):
    tmp, config_path = setup
    config = load_config(config_path, ["train.run_name=frozen", "optim.epochs=2", "method.dropout=0.1"])
    run(config, tmp / "runs" / "frozen", cpu=True)
    model, optimizer = captured["exp"].model, captured["opt"]
    assert captured["modes"] and set(captured["modes"]) == {(False, True)}  # VPT: frozen encoder in eval mode
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for _, p in vp.trainable_parameters(model)}
    assert set(vp.count_parameters(model)["by_group"]) == {"vpt", "head"}
    vp.detach(model)  # the original model: every pretrained weight but the new head untouched
    pretrained = load_file(config.model.checkpoint)
    for name, tensor in model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(tensor, pretrained[name]), name


def test_accumulation_keeps_the_batch_per_step_and_bf16_trains(setup):
    """data.batch_size is the batch per optimizer step: 2 micro-batches of 5 equal 1 batch of 10."""
    tmp, config_path = setup
    base = ["optim.epochs=2", "data.batch_size=10", "optim.name=sgd", "optim.lr=0.05"]
    results = {}
    for name, extra in (("accum1", []), ("accum2", ["optim.grad_accum=2"]), ("bf16", ["train.mixed_precision=bf16"])):
        config = load_config(config_path, [*base, *extra, f"train.run_name={name}"])
        results[name] = run(config, tmp / "runs" / name, cpu=True)
    one, two = _records(tmp / "runs" / "accum1"), _records(tmp / "runs" / "accum2")
    assert [r["step"] for r in one if "train/loss" in r] == [r["step"] for r in two if "train/loss" in r]
    assert [r["lr"] for r in one if "lr" in r] == pytest.approx([r["lr"] for r in two if "lr" in r])
    assert _epoch_losses(tmp / "runs" / "accum1") == pytest.approx(_epoch_losses(tmp / "runs" / "accum2"), rel=1e-4)
    assert results["accum1"]["test"]["loss"] == pytest.approx(results["accum2"]["test"]["loss"], rel=1e-4)
    bf16 = _epoch_losses(tmp / "runs" / "bf16")
    assert bf16 == pytest.approx(_epoch_losses(tmp / "runs" / "accum1"), rel=0.05) and bf16[-1] < bf16[0]
    with pytest.raises(ConfigError, match=r"batch_size 10 is not divisible by 1 process\(es\) x optim.grad_accum 3"):
        run(load_config(config_path, [*base, "optim.grad_accum=3", "train.run_name=bad"]), tmp / "bad", cpu=True)


@pytest.mark.slow
def test_adaptformer_image_recipe_head_trains_and_reloads_with_its_batchnorm_statistics(setup):
    # AdaptFormer's main_image.py: trunc_normal(0.01) classifier, zero bias, BatchNorm1d(affine=False) in front
    tmp, config_path = setup
    overrides = [
        "method={name: adaptformer, bottleneck: 4}",
        "model.head_norm=batchnorm",
        "model.head_init_std=0.01",
        "train.run_name=bn_head",
        "optim.epochs=2",
    ]
    config = load_config(config_path, overrides)
    fresh = classification.build_experiment(config).model
    norm, linear = fresh.head
    assert isinstance(norm, torch.nn.BatchNorm1d) and not norm.affine and norm.eps == 1e-6
    assert 0.005 < linear.weight.std().item() < 0.015 and not linear.bias.any()
    run_dir = Path(config.train.output_dir) / "bn_head"
    results = run(config, run_dir, cpu=True)
    saved = load_file(run_dir / "last" / "visionpeft_adapter.safetensors")
    assert saved["head.0.running_mean"].abs().sum() > 0  # the statistics the head was trained with travel along
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "eval.py"), str(run_dir), "--cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{100 * results['test']['top1']:.2f}" in result.stdout or f"{results['test']['top1']:.4f}" in result.stdout


def test_recipe_head_options_refuse_a_model_without_a_linear_head(setup):
    tmp, config_path = setup
    config = load_config(config_path, ["model.head_norm=batchnorm", "model.library=open_clip", "model.name=ViT-B-32"])
    with pytest.raises(ConfigError, match="apply to timm classifiers"):
        classification.build_experiment(config)
