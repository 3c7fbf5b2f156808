"""The demo benchmark is a sweep spec (grids/demo.yaml) run by the sweep tool; the gallery is its report."""

from __future__ import annotations

import json

import pytest
from _demo_utils import ROOT
from _sweep_utils import sweep
from benchmarks import demo  # noqa: E402

from visionpeft.sweep.spec import load_spec_file

SUMMARY = "# Sweep report: demo\n\nConfig ...\n\n| method | params (M) | digits |\n|---|---:|---:|\n"
SUMMARY += "| lora | 0.037 | 94.0 |\n"


@pytest.mark.slow
def test_the_demo_spec_checks_and_plans_every_method_on_every_mini_task(tmp_path, capsys):
    code, text, _ = sweep([demo.SPEC, "--out", tmp_path / "demo", "--dry-run"], capsys)
    assert code == 0
    assert text.startswith("stage select (48 runs, seed 0):")  # 8 methods x 2 learning rates x 3 tasks
    assert text.count("pending faces/scratch final seed 0") == 1  # one point: nothing to choose
    assert "+ 24 runs once stage select has chosen the point of 24 task x grid pairs" in text


def test_gallery_is_the_sweep_report_with_the_command(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "summary.md").write_text(SUMMARY)
    (sweep_dir / "summary.csv").write_text("method,task,top1_mean\nlora,digits,94.0\n")
    text = demo.write_gallery(sweep_dir, tmp_path / "gallery", "python tools/benchmark.py demo --seeds 0")
    assert text.startswith("# Demo sweep: the FractalDB-pretrained tiny ViT on the mini tasks\n")
    assert "Made by `python tools/benchmark.py demo --seeds 0`" in text and "# Sweep report" not in text
    assert "| lora | 0.037 | 94.0 |" in text
    saved = json.loads((tmp_path / "gallery" / "demo_results.json").read_text())
    assert saved == {
        "command": "python tools/benchmark.py demo --seeds 0",
        "rows": [{"method": "lora", "task": "digits", "top1_mean": "94.0"}],
    }


#: the demo specs whose galleries are committed: the methods of grids/demo.yaml, and the [zoo] and [lycoris] methods'
#: own specs
SPECS = [demo.SPEC, ROOT / "grids" / "demo_zoo.yaml", ROOT / "grids" / "demo_lycoris.yaml"]


@pytest.mark.parametrize("spec", SPECS, ids=lambda path: path.stem)
def test_committed_gallery_names_the_command_that_made_it_and_the_spec_s_methods(spec):
    made = json.loads((ROOT / "gallery" / f"{spec.stem}_results.json").read_text())
    assert made["command"].startswith("python tools/benchmark.py demo")
    assert (spec == demo.SPEC) != (f"--spec grids/{spec.name}" in made["command"])
    gallery = (ROOT / "gallery" / f"{spec.stem}_results.md").read_text()
    assert f"`{made['command']}`" in gallery
    rows = [line.split("|")[1].split()[0] for line in _results_table(gallery)][1:]
    assert rows == list(load_spec_file(spec).grids)
    assert (ROOT / "gallery" / f"{spec.stem}_accuracy_vs_params.png").is_file()


def _results_table(gallery: str) -> list[str]:
    """The rows of the gallery's first table (methods x tasks), header included, separator left out."""
    lines = gallery[gallery.index("| method |") :].split("\n\n")[0].splitlines()
    return [line for line in lines if not line.startswith("|---")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda path: path.stem)
def test_readme_shows_the_committed_gallery_table(spec):
    gallery = (ROOT / "gallery" / f"{spec.stem}_results.md").read_text()
    rows = _results_table(gallery)
    readme = (ROOT / "README.md").read_text()
    assert len(rows) == 1 + len(load_spec_file(spec).grids) and all(row in readme for row in rows)


def test_the_recorded_command_names_a_runs_or_gallery_folder_that_is_not_the_default():
    import argparse

    args = argparse.Namespace(spec=ROOT / "grids" / "demo_zoo.yaml", tasks=["textures"], epochs=8, seeds=[0, 1])
    default = argparse.Namespace(**vars(args), runs=ROOT / "runs" / "sweeps" / "demo_zoo", out=ROOT / "gallery")
    expected = "python tools/benchmark.py demo --spec grids/demo_zoo.yaml --tasks textures --epochs 8 --seeds 0 1"
    assert demo.command_line(default) == expected
    moved = argparse.Namespace(**vars(args), runs=ROOT / "runs" / "elsewhere", out=ROOT / "gallery" / "more")
    assert demo.command_line(moved) == f"{expected} --runs runs/elsewhere --out gallery/more"
