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


def test_the_dtype_keyword_loads_float32_without_a_deprecation_warning():
    """The dtype goes under the name the installed diffusers reads (``dtype`` from 0.40, which deprecated
    ``torch_dtype``): no deprecation warning, and the text encoder is fp32 too (transformers 5 would otherwise load
    the stored dtype)."""
    import warnings

    import torch
    from diffusers import StableDiffusionPipeline

    from visionpeft.backbones.diffusers_loading import dtype_keyword

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        pipe = StableDiffusionPipeline.from_pretrained(PIPELINE, **dtype_keyword(torch.float32))
    assert {p.dtype for part in (pipe.unet, pipe.vae, pipe.text_encoder) for p in part.parameters()} == {torch.float32}


def test_the_dtype_keyword_follows_the_diffusers_release(monkeypatch):
    import diffusers
    import torch

    from visionpeft.backbones.diffusers_loading import dtype_keyword

    monkeypatch.setattr(diffusers, "__version__", "0.39.0")
    assert dtype_keyword(torch.float16) == {"torch_dtype": torch.float16}
    monkeypatch.setattr(diffusers, "__version__", "0.40.0")
    assert dtype_keyword(torch.float16) == {"dtype": torch.float16}
