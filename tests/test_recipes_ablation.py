"""The [recipes] ablation (``python tools/benchmark.py recipes-ablation``): its subject sets differ from the
demo's only where the row says (the masked row: the ink as a loss mask; the buckets row: the shapes, whose square
crop is the original image), a row below every baseline seed is flagged, and the gallery's table is what the
command writes from its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionpeft.data.few_images import FewImages, ImageKnobs

ROOT = Path(__file__).resolve().parents[1]
GALLERY = ROOT / "gallery" / "diffusion"

from benchmarks.recipes_ablation import INK, PADDED, ROWS, subject_sets, summary, write_table  # noqa: E402


def _items(folder: Path, **knobs) -> list[dict]:
    images = FewImages(
        folder, "sks", 32, "fixed", "a handwritten digit {}", 1, True, 0.0, 0, False, ImageKnobs(**knobs)
    )
    return [images[i] for i in range(len(images))]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sets")
    return subject_sets(tmp / "out", tmp / "work")


def test_the_masked_set_is_the_subject_with_its_ink_as_the_loss_mask(sets):
    plain, masked = _items(sets["subject"]), _items(sets["masked"], alpha_mask=True)
    for i, (p, m) in enumerate(zip(plain, masked)):
        assert torch.equal(p["pixel_values"], m["pixel_values"])
        ink = np.asarray(Image.open(sets["subject"] / f"{i}.png")).max(axis=-1) > INK
        assert torch.equal(m["mask"][0] > 0.5, torch.from_numpy(ink)) and 0.2 < ink.mean() < 0.8


def test_the_mixed_set_crops_back_to_the_subject_and_buckets_keep_its_shapes(sets):
    files = sorted(sets["mixed"].glob("*.png"))
    assert [Image.open(f).size for f in files] == [PADDED.get(i, (32, 32)) for i in range(5)]
    for p, m in zip(_items(sets["subject"]), _items(sets["mixed"])):
        assert torch.equal(p["pixel_values"], m["pixel_values"])  # buckets off: the baseline's pixels
    bucketed = _items(sets["mixed"], buckets=(16, 64, 8))
    assert sorted(tuple(item["pixel_values"].shape[1:]) for item in bucketed) == [
        (24, 40),
        (32, 32),
        (32, 32),
        (32, 32),
        (40, 24),
    ]


def _record(after: float, seed: int = 0) -> dict:
    return {
        "seed": seed,
        "prompt": "a handwritten digit sks",
        "steps": 300,
        "after": after,
        "before": 0.0,
        "others_after": 0.5,
        "others_before": 0.9,
        "sevens_elsewhere_after": 0.25,
        "sevens_elsewhere_before": 0.0,
        "minutes": 3.0,
    }


def test_a_row_below_every_baseline_seed_breaks_learning(tmp_path):
    records = {
        "baseline": [_record(0.8), _record(0.9, 1)],
        "min_snr": [_record(0.81), _record(0.79, 1)],
        "huber": [_record(0.7), _record(0.75, 1)],
    }
    rows = summary(records)
    assert [row for row, r in rows.items() if r["breaks_learning"]] == ["huber"]
    results = {
        "command": "c",
        "seeds": [0, 1],
        "steps": 20,
        "samples": 16,
        "drift_samples": 8,
        "minutes": 1.0,
        "records": records,
    }
    write_table(results, tmp_path)
    table = (tmp_path / "ablation.md").read_text()
    assert f"| {ROWS['huber'][2]} | `dreambooth_lora_huber` | 300 | 72 ± 4 **(below every baseline seed)** |" in table
    assert f"| {ROWS['min_snr'][2]} | `dreambooth_lora_min_snr` | 300 | 80 ± 1 | 50 (90) | 25 | 3.0 |" in table


def test_the_gallery_table_is_what_the_command_writes_from_its_json(tmp_path):
    results = json.loads((GALLERY / "ablation.json").read_text())
    assert set(results["records"]) == set(ROWS) and all(
        len(r) == len(results["seeds"]) for r in results["records"].values()
    )
    assert results["summary"] == json.loads(json.dumps(summary(results["records"])))
    write_table(results, tmp_path)
    assert (tmp_path / "ablation.md").read_text() == (GALLERY / "ablation.md").read_text()
    assert (GALLERY / "ablation.png").is_file()
