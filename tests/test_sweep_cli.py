"""The sweep command: --dry-run lists the runs, and bad input is one error line, exit 2, before any run."""

from __future__ import annotations

import pytest
from _sweep_utils import DIGITS, FAST, sweep, write_grid

from visionpeft.sweep import executors

GRID = "optim.lr: [0.01, 0.005]\nmethod.num_tokens: [2, 4]\n"


def test_dry_run_lists_every_run_and_writes_nothing(tmp_path, capsys):
    grid = write_grid(tmp_path, "vpt", GRID)
    out = tmp_path / "sweep"
    code, text, _ = sweep(
        [DIGITS, *FAST, "--grid", grid, "--protocol", "holdout", "--seeds", "0", "1", "--out", out, "--dry-run"], capsys
    )
    assert code == 0
    lines = text.splitlines()
    assert lines[0] == "stage select (4 runs, seed 0):"
    assert sum("pending digits/vpt select seed 0 [optim.lr=" in line for line in lines) == 4
    assert "  pending digits/vpt select seed 0 [optim.lr=0.005, method.num_tokens=2]  " in text
    assert "stage final (0 runs so far):" in text
    assert "+ 2 runs once stage select has chosen the point of 1 task x grid pairs (2 seed(s) each)" in text
    assert not out.exists()


def test_a_one_point_grid_skips_selection(tmp_path, capsys):
    grid = write_grid(tmp_path, "vpt", "optim.lr: 0.01\n")
    code, text, _ = sweep(
        [
            DIGITS,
            *FAST,
            "--grid",
            grid,
            "--protocol",
            "holdout",
            "--seeds",
            "0",
            "1",
            "--out",
            tmp_path / "sweep",
            "--dry-run",
        ],
        capsys,
    )
    assert code == 0 and "stage select" not in text
    assert text.count("pending digits/vpt final seed ") == 2


@pytest.mark.parametrize(
    ("grid", "args", "message"),
    [
        (
            "optim.lrr: [0.1, 0.01]\n",
            [],
            "error: grid 'g': unknown config key 'optim.lrr' in override 'optim.lrr=0.1' (did you mean 'optim.lr'?)",
        ),
        ("method.num_tokenz: [2, 4]\n", [], "did you mean 'num_tokens'?"),
        ("optim.lr: [0.1, -1.0]\n", [], "error: grid 'g': config key 'optim.lr' must be at least 0, got -1.0"),
        ("optim.lr: []\n", [], "error: grid 'g': axis 'optim.lr' is empty; give it at least one value"),
        ("optim.lr: [0.1]\n", ["--tasks", "digit"], "error: unknown task 'digit' (did you mean 'digits'?)"),
        ("optim.lr: [0.1]\n", ["--tasks", "vtab", "dmlabb"], "error: unknown task 'dmlabb' (did you mean 'dmlab'?)"),
        ("optim.lr: [0.1]\n", ["--seeds", "1", "1"], "error: seeds must be distinct"),
        (
            "optim.lr: [0.1]\n",
            ["optim.lrr=0.1"],
            "error: unknown config key 'optim.lrr' in override 'optim.lrr=0.1' (did you mean 'optim.lr'?)",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_run(tmp_path, capsys, grid, args, message):
    out = tmp_path / "sweep"
    path = write_grid(tmp_path, "g", grid)
    code, _, err = sweep([DIGITS, *FAST, "--grid", path, "--protocol", "holdout", "--out", out, *args], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err
    assert not out.exists()


@pytest.mark.parametrize(("executor", "extra"), [("slurm", "slurm"), ("ray", "ray")])
def test_an_executor_without_its_extra_names_the_pip_line(tmp_path, capsys, monkeypatch, executor, extra):
    real = executors.importlib.util.find_spec
    module = executors.EXTRAS[executor][0]
    monkeypatch.setattr(executors.importlib.util, "find_spec", lambda name: None if name == module else real(name))
    path = write_grid(tmp_path, "g", GRID)
    code, _, err = sweep([DIGITS, "--grid", path, "--executor", executor, "--out", tmp_path / "s"], capsys)
    assert code == 2
    assert err == f'error: the {executor} executor needs {module}: pip install "visionpeft[{extra}]"\n'
    assert not (tmp_path / "s").exists()


def test_a_sweep_folder_keeps_its_spec(tmp_path, capsys):
    path = write_grid(tmp_path, "g", GRID)
    (tmp_path / "s").mkdir()
    code, _, err = sweep([tmp_path / "s"], capsys)
    assert code == 2 and err.startswith("error: ") and "is not a sweep folder (it has no sweep.yaml)" in err
    code, _, err = sweep([tmp_path / "s", "--grid", path], capsys)
    assert code == 2 and "is a sweep folder: it keeps its spec" in err
