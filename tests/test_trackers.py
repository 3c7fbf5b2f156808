"""Run trackers: scalars and validation images reach TensorBoard through accelerate; a resumed run purges the
events logged after its saved state; ``none`` writes nothing; a missing tracker library is one line."""

from __future__ import annotations

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from visionpeft.errors import ConfigError
from visionpeft.trainers.loop import LoopConfig, make_accelerator
from visionpeft.trainers.trackers import RunTrackers, check_report_to


def _events(folder):
    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_scalars_and_images_reach_tensorboard(tmp_path):
    accelerator = make_accelerator(LoopConfig(report_to="tensorboard"), cpu=True, run_dir=tmp_path)
    trackers = RunTrackers(accelerator, tmp_path, "tensorboard")
    trackers.log({"train/loss": 1.5}, step=3)
    trackers.log_images("validation/samples", [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (4, 4))], 3)
    trackers.flush()
    events = _events(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 1.5)]
    assert {tag.split("/image/")[0] for tag in events.Tags()["images"]} == {"validation/samples"}
    accelerator.end_training()


def test_a_resumed_run_purges_the_events_after_its_state(tmp_path):
    first = make_accelerator(LoopConfig(report_to="tensorboard"), cpu=True, run_dir=tmp_path)
    trackers = RunTrackers(first, tmp_path, "tensorboard")
    for step in (1, 2, 3, 4):
        trackers.log({"train/loss": float(step)}, step=step)
    first.end_training()
    again = make_accelerator(LoopConfig(report_to="tensorboard"), cpu=True, run_dir=tmp_path)
    resumed = RunTrackers(again, tmp_path, "tensorboard")
    resumed.purge_step = 3  # the state was saved at step 2
    resumed.log({"train/loss": 30.0}, step=3)
    again.end_training()
    assert [(e.step, e.value) for e in _events(tmp_path / "tensorboard").Scalars("train/loss")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
    ]


def test_none_writes_no_tracker_files(tmp_path):
    accelerator = make_accelerator(LoopConfig(report_to="none"), cpu=True, run_dir=tmp_path)
    RunTrackers(accelerator, tmp_path, "none").log({"train/loss": 1.0}, step=1)
    assert list(tmp_path.iterdir()) == []


def test_wandb_without_the_package_is_one_line(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install wandb"):
        check_report_to("wandb")
