"""Loading a pipeline prints no per-component progress bars, and leaves the libraries' bar switches as they were."""

from __future__ import annotations

from pathlib import Path

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from visionpeft.backbones.diffusers_loading import load_pipeline

PIPELINE = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny_sd"


def test_pipeline_load_shows_no_loading_bars(capfd):
    load_pipeline(str(PIPELINE))
    shown = capfd.readouterr()
    assert "Loading" not in shown.err + shown.out
    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()


def test_a_users_disabled_bars_stay_disabled():
    diffusers_logging.disable_progress_bar()
    try:
        load_pipeline(str(PIPELINE))
        assert not diffusers_logging.is_progress_bar_enabled()
    finally:
        diffusers_logging.enable_progress_bar()
