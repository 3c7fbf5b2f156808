"""The CLIP gallery's command (tools/benchmarks/clip_demo.py): every method row is a valid run of the one demo recipe on
the shipped tiny CLIP, runs that select on val keep val, and the table says when a cell has fewer seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks import clip_demo

from visionpeft.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", [m for m, (overrides, _) in clip_demo.METHODS.items() if overrides is not None])
def test_every_trained_row_is_the_demo_recipe_with_its_method(method):
    overrides = clip_demo.METHODS[method][0]
    config = load_config(clip_demo.CONFIG, [f"model.name={ROOT / 'checkpoints' / 'tiny_clip'}", *overrides])
    assert config.method.name == method
    assert config.optim.lr == 0.02 and config.data.batch_size == 16  # the one recipe: nothing tuned per method


def test_deep_prompts_fit_the_tiny_clip_towers():
    """IVLP / PromptSRC / MaPLe prompt depths stay inside the tiny CLIP's 4 layers per tower."""
    layers = json.loads((ROOT / "checkpoints" / "tiny_clip" / "open_clip_config.json").read_text())["model_cfg"]
    assert layers["vision_cfg"]["layers"] == layers["text_cfg"]["layers"] == 4
    for method in ("ivlp", "promptsrc", "maple"):
        config = load_config(clip_demo.CONFIG, clip_demo.METHODS[method][0])
        depths = [v for k, v in config.method.items() if "depth" in k]
        assert depths and all(0 < d < 4 for d in depths), method


def test_transfer_rows_are_prompt_learners_and_select_on_val_keeps_val():
    assert set(clip_demo.TRANSFERS) <= set(clip_demo.METHODS)
    assert "tip_adapter" not in clip_demo.TRANSFERS and "linear" not in clip_demo.TRANSFERS
    assert set(clip_demo.SELECT_ON_VAL) <= set(clip_demo.METHODS)


def test_a_cell_with_fewer_runs_than_the_table_s_seeds_says_so():
    assert clip_demo.mean_std([70.0, 72.0, 74.0], 3) == "72.0 ± 2.0"
    assert clip_demo.mean_std([77.1], 3) == "77.1 (1 of 3 seeds)"


def test_the_committed_gallery_lists_every_run_it_holds():
    record = json.loads((ROOT / "gallery" / "clip" / "results.json").read_text())
    text = (ROOT / "gallery" / "clip" / "results.md").read_text()
    assert clip_demo.markdown(record).strip() == text.strip()  # the table is what the command writes from its json
    for method in clip_demo.fewshot_methods(record):
        assert clip_demo.METHODS[method][1] in text
