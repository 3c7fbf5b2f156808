"""The embedded tiny text-to-image pipeline: the shipped folder, its data, its judge and the pretraining command."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from visionpeft.demo.captioned_mix import HELD_OUT, SUBJECTS, captioned_mix

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "checkpoints" / "tiny_sd"
JUDGE = ROOT / "checkpoints" / "tiny_sd_judge.safetensors"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

#: mean and first pixels of two images, 4 DDIM steps, seed 0, "a handwritten digit three" (see the test)
GENERATE = """
import json, sys
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
out = pipe(["a handwritten digit three"] * 2, num_inference_steps=4, guidance_scale=3.0, output_type="np",
           generator=torch.Generator().manual_seed(0)).images
print(json.dumps({"mean": float(out.mean()), "corner": out[0, :2, :2, 0].round(4).tolist(), "shape": list(out.shape),
                  "visionpeft": any(m.startswith("visionpeft") for m in sys.modules)}))
"""


#: what GENERATE printed for the shipped checkpoint when it was exported (a changed checkpoint, loader or sampler
#: moves these numbers)
REFERENCE = {"mean": 0.30248907, "corner": [[0.0545, 0.1086], [0.0487, 0.0644]]}


def _generate(folder: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", GENERATE, str(folder)], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_shipped_pipeline_loads_with_diffusers_alone_and_is_deterministic():
    reference = REFERENCE
    first = _generate(PIPELINE)
    assert first["visionpeft"] is False  # diffusers alone
    assert first["shape"] == [2, 32, 32, 3]
    assert abs(first["mean"] - reference["mean"]) < 2e-3
    assert np.allclose(first["corner"], reference["corner"], atol=5e-3)
    assert sum(f.stat().st_size for f in PIPELINE.rglob("*") if f.is_file()) < 30 * 2**20


def _fingerprints(images: np.ndarray) -> set[str]:
    return {hashlib.sha1(im.tobytes()).hexdigest() for im in images}


def test_held_out_subjects_are_absent_from_the_pretraining_data():
    pretraining = captioned_mix("all")  # what configs/pretrain/tiny_sd.yaml trains on
    everything = captioned_mix("all", exclude=())
    assert set(HELD_OUT) <= everything.subjects()  # the builder can produce them ...
    assert not set(HELD_OUT) & pretraining.subjects()  # ... and pretraining leaves them out
    assert not any(word in c for c in pretraining.captions for word in ("seven", "brick"))
    held = everything.images[np.isin(everything.targets, [SUBJECTS.index(s) for s in HELD_OUT])]
    assert len(held) > 100 and not _fingerprints(held) & _fingerprints(pretraining.images)


@pytest.mark.slow
def test_the_pretraining_split_holds_each_digit_once():
    # "all" holds the digits of train + val + test; the sweep's "trainval" split must not add train and val again
    from visionpeft.demo.captioned_mix import SUBJECTS

    def digits(images):
        return sum(SUBJECTS[t].startswith("digit") for t in images.targets)

    parts = [captioned_mix(split) for split in ("train", "val", "test")]
    assert digits(captioned_mix("all")) == sum(digits(part) for part in parts) == 1618


def test_pretraining_config_holds_the_subjects_out():
    from visionpeft.config import load_config

    config = load_config(ROOT / "configs" / "pretrain" / "tiny_sd.yaml")
    assert set(config.data.exclude) == set(HELD_OUT)


@pytest.mark.slow
def test_judge_accuracy_is_reproduced_on_its_test_split():
    from safetensors import safe_open

    from visionpeft.demo.judge import Judge

    with safe_open(str(JUDGE), "pt") as f:
        stored = json.loads(f.metadata()["test_accuracy"])
    test = captioned_mix("test", exclude=())
    predicted = Judge.load(JUDGE).logits(test.images).argmax(-1).numpy()
    measured = float((predicted == np.array(test.targets)).mean())
    assert measured == pytest.approx(stored, abs=1e-9)
    assert measured > 0.8


@pytest.mark.slow
def test_kid_separates_real_from_noise():
    from visionpeft.demo.judge import Judge, kid

    judge = Judge.load(JUDGE)
    images = captioned_mix("test", exclude=(), max_per_subject=20).images
    first, second = images[0::2], images[1::2]  # different real images of the same subjects
    noise = np.random.default_rng(0).integers(0, 256, size=second.shape, dtype=np.uint8)
    same, _ = kid(judge, first, second, subsets=10)
    different, _ = kid(judge, first, noise, subsets=10)
    assert different > 10 * max(same, 1e-4)


@pytest.mark.slow
def test_pretrain_command_lowers_the_loss_and_saves_a_loadable_pipeline(tmp_path):
    overrides = [
        "model.vae_channels=[8,16]",
        "model.unet_channels=[8,16,16]",
        "model.text_width=16",
        "model.text_layers=1",
        "model.text_heads=2",
        "model.max_tokens=8",
        "vae.steps=5",
        "vae.batch_size=8",
        "data.options={max_per_subject: 4}",
        "data.batch_size=8",
        "optim.steps=40",
        "optim.warmup_steps=0",
        "optim.lr=1e-2",
        "train.log_every=1",
        "train.eval_every=40",
        "train.validation_images=1",
        "train.validation_steps=2",
        "train.ema_decay=null",
        f"train.output_dir={tmp_path / 'runs'}",
    ]
    command = [
        sys.executable,
        str(ROOT / "tools" / "pretrain.py"),
        str(ROOT / "configs" / "pretrain" / "tiny_sd.yaml"),
        *overrides,
        "--out",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "tiny_sd" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 40
    # an untrained U-Net predicts noise with a loss near 1; 40 steps bring it well under (lr 0 would not)
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:3])
    folder = tmp_path / "out" / "tiny_sd"
    assert "Held out" in (folder / "README.md").read_text()
    assert _generate(folder)["shape"] == [2, 32, 32, 3]


def test_an_unknown_held_out_subject_is_one_clear_error():
    from visionpeft.errors import DataError

    with pytest.raises(DataError, match=r"unknown subject\(s\) \['digit 11'\]; the subjects are digit 0"):
        captioned_mix("all", exclude=["digit 11"])
