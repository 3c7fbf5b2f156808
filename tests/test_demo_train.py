"""The README's main command and the pretraining-vs-scratch control, on short schedules."""

from __future__ import annotations

import pytest
from _demo_utils import train_demo


@pytest.mark.slow
def test_readme_main_command_beats_chance_on_a_short_schedule(tmp_path):
    assert train_demo(tmp_path, "vpt", "optim.epochs=2") > 0.5  # ten digits: chance is 0.1


@pytest.mark.slow
def test_fractal_pretraining_beats_the_same_budget_from_scratch(tmp_path):
    short = ["optim.epochs=2", "data.name=digits", "method=full", "optim.lr=0.0005"]
    pretrained = train_demo(tmp_path, "pretrained", *short)
    scratch = train_demo(tmp_path, "scratch", *short, "model.checkpoint=null", "model.pretrained=false")
    assert pretrained > 0.5  # ten digits: chance is 0.1 (measured: 81.4% vs 28.6% from scratch)
    assert pretrained > scratch + 0.2
