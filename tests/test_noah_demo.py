"""The noah-demo benchmark (tools/benchmarks/noah_demo.py): its search sizes, command line and ``visionpeft noah``
arguments, bad input in one line before any training, the step clock, and the gallery written from a fabricated
task folder; the committed gallery names the command that made it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from _demo_utils import ROOT
from benchmarks import noah_demo

from visionpeft.methods import make_config

COMMAND = (
    "python tools/benchmark.py noah-demo --tasks digits textures faces --seeds 0 1 2 --budget 30000 "
    "--supernet-epochs 5 --epochs 8 --population 10 --generations 4"
)


def test_search_sizes_scale_the_official_population_select_mutation_and_crossover():
    assert noah_demo.search_sizes(50) == {"population": 50, "select": 10, "mutation": 25, "crossover": 25}
    assert noah_demo.search_sizes(20) == {"population": 20, "select": 4, "mutation": 10, "crossover": 10}
    assert noah_demo.search_sizes(2) == {"population": 2, "select": 1, "mutation": 1, "crossover": 1}


def test_the_command_line_spells_out_every_setting_and_parses_back_to_the_same_options():
    args = noah_demo.parser().parse_args([])
    assert noah_demo.command_line(args) == COMMAND
    again = noah_demo.parser().parse_args(COMMAND.split()[3:])
    assert vars(again) == vars(args)


def test_search_arguments_are_the_noah_command_s_own(tmp_path):
    from visionpeft.cli.noah import _parser

    options = ["--budget", "25K", "--population", "12", "--generations", "3", "--epochs", "3"]
    args = noah_demo.parser().parse_args(options)
    argv = noah_demo.search_arguments(args, tmp_path / "supernet", tmp_path / "search")
    parsed = _parser().parse_intermixed_args(argv)
    assert parsed.run_dir == tmp_path / "supernet" and parsed.overrides == ["optim.epochs=3"]
    assert (parsed.budget, parsed.population, parsed.select, parsed.mutation, parsed.crossover) == (25_000, 12, 2, 6, 6)
    assert (parsed.generations, parsed.protocol, parsed.workers, parsed.out) == (3, "holdout", 1, tmp_path / "search")
    assert parsed.retrain_seeds is None  # the search alone; the retrain is the same arguments + --retrain-seeds


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "cifar100"], "error: noah-demo runs on the mini tasks (digits, textures, faces), not on cifar100"),
        (["--generations", "-1"], "error: noah search generations must be positive, got -1"),
    ],
)
def test_bad_input_is_one_line_before_anything_trains(tmp_path, capsys, argv, message):
    assert noah_demo.main([*argv, "--runs", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == message + "\n"
    assert not (tmp_path / "runs").exists()


def test_timed_adds_each_call_s_wall_seconds_to_its_step_and_passes_the_exit_code_on(tmp_path, monkeypatch):
    clock = iter([100.0, 105.5, 200.0, 212.0, 300.0, 301.0])
    monkeypatch.setattr(noah_demo.time, "perf_counter", lambda: next(clock))
    assert noah_demo.timed(tmp_path, "search", lambda: 0) == 0
    assert noah_demo.timed(tmp_path, "search", lambda: 1) == 1  # resumed: the second call's time is added
    assert noah_demo.timed(tmp_path, "retrain", lambda: 0) == 0
    assert json.loads((tmp_path / noah_demo.TIMES).read_text()) == {"search": 17.5, "retrain": 1.0}


SUBNET = {"vpt": [10, 5, 0, 0, 0, 0], "lora": [5, 5, 1, 0, 0, 0], "adapter": [1, 1, 1, 1, 1, 1]}


def fabricate_task(folder: Path, task: str) -> None:
    """The files a finished task leaves: the search's subnet and history, the retrain's report, the step times."""
    search = folder / "search"
    (search / "retrain").mkdir(parents=True)
    space = make_config("noah", {f"{m}_depths": [3, 6] for m in ("vpt", "lora", "adapter")}).to_dict()
    history = {"space": json.loads(json.dumps(space)), "geometry": {"layers": 6, "width": 192, "qkv": 576}}
    (search / "history.json").write_text(json.dumps(history))
    (search / "subnet.json").write_text(json.dumps({"subnet": SUBNET, "parameters": 21_000, "top1": 0.9532}))
    fields = ["method", "task", "seeds", "top1_mean", "top1_std", "trainable", "trainable_without_head", "state"]
    with open(search / "retrain" / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerow({"method": "noah", "task": task, "seeds": 3, "top1_mean": 93.13, "top1_std": 0.36,
                         "trainable": 22_930, "trainable_without_head": 21_000, "state": ""})  # fmt: skip
    (folder / noah_demo.TIMES).write_text(json.dumps({"supernet": 300.0, "search": 120.0, "retrain": 600.0}))


def test_gallery_rows_come_from_the_task_folders_and_a_missing_task_is_a_dash(tmp_path):
    args = noah_demo.parser().parse_args(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "gallery")])
    assert noah_demo.write_gallery(args, ["digits", "textures"], "the command") is None  # nothing has finished
    assert not (tmp_path / "gallery").exists()
    fabricate_task(tmp_path / "runs" / "digits", "digits")
    text = noah_demo.write_gallery(args, ["digits", "textures"], "the command")
    assert "Made by `the command`\non a 2-core CPU shared with other jobs, in 17 minutes of wall time." in text
    assert (
        "| method | params (M) | digits | textures |\n|---|---:|---:|---:|\n| noah | 0.021 | 93.1 ± 0.4 | - |" in text
    )
    # 6 x (10 x 192 + 10 x (192 + 576) + 10 x (2 x 192 + 1) + 192): every module at width 10 in all six blocks
    assert "(the largest subnet of this space trains 81,852)" in text
    subnet = "vpt 10 5 0 0 0 0; lora 5 5 1 0 0 0; adapter 1 1 1 1 1 1"
    assert f"| digits | {subnet} | 21,000 | 95.3 | 5.0 / 2.0 / 10.0 |\n| textures | - | - | - | - |" in text
    assert (tmp_path / "gallery" / "demo_noah_results.md").read_text() == text
    saved = json.loads((tmp_path / "gallery" / "demo_noah_results.json").read_text())
    assert saved == {
        "command": "the command",
        "minutes": 17.0,
        "rows": [
            {
                "task": "digits",
                "seeds": 3,
                "top1_mean": 93.13,
                "top1_std": 0.36,
                "trainable_without_head": 21_000,
                "state": "",
                "subnet": SUBNET,
                "subnet_parameters": 21_000,
                "search_val_top1": 95.32,
                "largest_subnet_parameters": 81_852,
                "minutes": {"supernet": 5.0, "search": 2.0, "retrain": 10.0},
            }
        ],
    }


def test_committed_gallery_names_the_command_that_made_it_and_has_every_task_with_three_seeds():
    made = json.loads((ROOT / "gallery" / "demo_noah_results.json").read_text())
    assert made["command"].startswith("python tools/benchmark.py noah-demo --tasks digits textures faces --seeds 0 1 2")
    assert [(row["task"], row["seeds"]) for row in made["rows"]] == [("digits", 3), ("textures", 3), ("faces", 3)]
    assert all(row["trainable_without_head"] == row["subnet_parameters"] for row in made["rows"])
    gallery = (ROOT / "gallery" / "demo_noah_results.md").read_text()
    assert f"`{made['command']}`" in gallery
    cells = [f"{row['top1_mean']:.1f} ± {row['top1_std']:.1f}" for row in made["rows"]]
    assert "| noah | " in gallery and all(cell in gallery for cell in cells)
