"""The step-based run: every schedule follows its formula step by step, warmup is honoured in steps or epochs,
evaluation happens every N optimizer steps exactly (and at the end), and a step run stops at its last step."""

from __future__ import annotations

import json
import math

import pytest
from _classify_utils import tiny_config, write_pretrained_vit, write_tiny_cifar10

from visionpeft.config import load_config
from visionpeft.trainers.classification import run

LR, STEPS = 0.01, 10  # the tiny set: 50 images, batch 8 -> 7 optimizer steps per epoch


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schedule")
    return tiny_config(tmp, write_pretrained_vit(tmp / "vit.safetensors"), write_tiny_cifar10(tmp / "data"))


def _run(config_path, name, *overrides):
    base = [
        f"train.run_name={name}",
        f"optim.lr={LR}",
        "optim.epochs=null",
        f"optim.steps={STEPS}",
        "optim.warmup_epochs=null",
        "train.eval_every=4",
        "data.val_split=null",
    ]
    config = load_config(config_path, [*base, *overrides])
    run_dir = config_path.parent / "runs" / name
    results = run(config, run_dir, cpu=True)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return results, records


def _lrs(records):
    return [r["lr"] for r in records if "lr" in r]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.schedule=constant"], lambda k: LR),
        (["optim.schedule=constant_with_warmup", "optim.warmup_steps=4"], lambda k: LR * min(1.0, k / 4)),
        (["optim.schedule=linear"], lambda k: LR * (1 - k / STEPS)),
        (
            ["optim.schedule=cosine", "optim.min_lr=0.001"],
            lambda k: 0.001 + (LR - 0.001) * 0.5 * (1 + math.cos(math.pi * k / STEPS)),
        ),
        (
            ["optim.schedule=polynomial", "optim.power=2.0", "optim.warmup_steps=2"],
            lambda k: LR * k / 2 if k < 2 else LR * (1 - (k - 2) / (STEPS - 2)) ** 2,
        ),
        (
            ["optim.schedule=cosine", "optim.warmup_epochs=1"],  # warmup in epochs: 7 steps
            lambda k: LR * k / 7 if k < 7 else LR * 0.5 * (1 + math.cos(math.pi * (k - 7) / (STEPS - 7))),
        ),
    ],
    ids=["constant", "constant_with_warmup", "linear", "cosine_min_lr", "polynomial", "warmup_epochs"],
)
def test_each_schedule_follows_its_formula_step_by_step(config_path, overrides, expected):
    _, records = _run(config_path, "sched_" + "_".join(o.split("=")[1] for o in overrides), *overrides)
    assert _lrs(records) == pytest.approx([expected(k) for k in range(1, STEPS + 1)], rel=1e-6, abs=1e-12)


def test_a_step_run_evaluates_every_n_steps_and_stops_at_its_last_step(config_path):
    results, records = _run(config_path, "every4", "optim.schedule=constant")
    assert results["steps"] == STEPS
    assert [r["step"] for r in records if "eval/top1" in r] == [4, 8, 10]  # not aligned with the 7-step epochs
    assert [r["step"] for r in records if "train/epoch_loss" in r] == [7]  # one whole epoch, then 3 steps
    assert [r["step"] for r in records if "test/top1" in r] == [10]


def test_the_recipes_say_their_schedule():
    from _classify_utils import ROOT

    for name in ("textual_inversion_sd15", "dreambooth_lora_sd15", "difffit_sd15"):
        config = load_config(ROOT / "configs" / "personalize" / f"{name}.yaml")
        assert (config.optim.schedule, config.optim.warmup_steps) == ("constant", 0), name
    vpt = load_config(ROOT / "configs" / "vpt_vitb_cifar.yaml")
    assert (vpt.optim.schedule, vpt.optim.warmup_epochs, vpt.optim.epochs) == ("cosine", 10, 100)
