"""The demo sweep's report: table and plot from run rows, and the committed gallery says how it was made."""

from __future__ import annotations

import json
import sys

from _demo_utils import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from benchmarks import demo  # noqa: E402


def _rows() -> list[dict]:
    rows = []
    for seed, (full, scratch, linear) in enumerate([(0.9, 0.5, 0.7), (0.8, 0.6, 0.7)]):
        for method, top1, trainable in (("full", full, 1010), ("scratch", scratch, 1010), ("linear", linear, 10)):
            rows.append({"task": "digits", "method": method, "seed": seed, "top1": top1, "trainable": trainable,
                         "head": 10, "seconds": 30.0})  # fmt: skip
    return rows


def test_table_reports_mean_and_std_over_seeds_and_the_scratch_control(tmp_path):
    text = demo.table(_rows(), ["digits"], ["linear", "full", "scratch"], [0, 1], "python tools/benchmark.py demo")
    assert "`python tools/benchmark.py demo`" in text and "seeds 0, 1" in text
    assert "| linear (linear probe) | 0 | 70.0 ± 0.0 | 0.5 |" in text  # head excluded; 30 s a run
    assert "| full (full fine-tuning) | 1,000 | 85.0 ± 7.1 | 0.5 |" in text
    assert "scratch: digits +30.0 points" in text and "Best pretrained method per task: digits full" in text
    demo.plot(_rows(), ["digits"], ["linear", "full", "scratch"], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_committed_gallery_names_the_command_that_made_it():
    made = json.loads((ROOT / "gallery" / "demo_results.json").read_text())
    assert made["command"].startswith("python tools/benchmark.py demo")
    assert f"`{made['command']}`" in (ROOT / "gallery" / "demo_results.md").read_text()
    assert {r["method"] for r in made["runs"]} == set(demo.RUNS)
    assert (ROOT / "gallery" / "demo_accuracy_vs_params.png").is_file()


def test_report_is_redrawn_from_saved_runs_without_training(tmp_path):
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"command": "python tools/benchmark.py demo --epochs 8", "runs": _rows()}))
    assert demo.main(["--from-json", str(saved), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "demo_results.md").read_text()
    assert "`python tools/benchmark.py demo --epochs 8`" in text and "seeds 0, 1" in text
    assert json.loads((tmp_path / "out" / "demo_results.json").read_text())["runs"] == _rows()


def test_readme_shows_the_committed_gallery_table():
    gallery = (ROOT / "gallery" / "demo_results.md").read_text()
    rows = [line for line in gallery.splitlines() if line.startswith("| ")]
    readme = (ROOT / "README.md").read_text()
    assert rows and all(row in readme for row in rows)
