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


SPEC_HEAD = f"config: {DIGITS}\n"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("grids: [a, b]\n", "'grids' must be a mapping of grid labels to grid files or inline grids"),
        ("grids: {a: 5}\n", "'grids' must be a mapping of grid labels to grid files or inline grids"),
        ("grids: {g: g.yaml}\nseeds: [one, two]\n", "'seeds' must be a list of integers"),
        ("grids: {g: g.yaml}\ntasks: digits\n", "'tasks' must be a list of strings or null"),
        ("grids: {g: g.yaml}\nprotocl: holdout\n", "unknown key 'protocl' (did you mean 'protocol'?)"),
        ("grids: {g: g.yaml}\nprotocol: holdot\n", "'protocol' must be one of vtab1k, holdout, none, got 'holdot'"),
        ("grids: {'../up': g.yaml}\n", "grid label '../up' must be a folder name"),
        ("grids: {g: g.yaml}\nseeds: [0]\nseeds: [1]\n", "key 'seeds' is written twice (lines 3 and 4)"),
    ],
)
def test_a_bad_spec_file_is_one_line_naming_the_file_and_key(tmp_path, capsys, body, message):
    """A sweep spec file with an entry of the wrong type (`grids: [a, b]`, `seeds: [one, two]`, `tasks: digits`,
    a grid that is a number), an unknown or twice-written key, a bad choice or a grid label that is a path: one line
    naming the file and the key, with the entry's meaning, before any config is read or folder made."""
    write_grid(tmp_path, "g", GRID)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC_HEAD + body)
    code, _, err = sweep([spec, "--out", tmp_path / "sweep"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: sweep spec {spec}") and message in err
    assert not (tmp_path / "sweep").exists()


def test_a_spec_whose_config_is_not_text_is_one_line(tmp_path, capsys):
    """`config: 5` in a spec file: one line naming the key and what it means."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("config: 5\ngrids: {g: {optim.lr: 0.1}}\n")
    code, _, err = sweep([spec], capsys)
    assert code == 2 and err.strip() == (
        f"error: sweep spec {spec}: 'config' must be a string (the base run config; in a spec file a path relative "
        "to the file), got 5"
    )


@pytest.mark.parametrize("damage", ["truncated", "extended", "emptied"])
def test_a_damaged_sweep_yaml_is_one_line_naming_it(tmp_path, capsys, damage):
    """A sweep folder whose `sweep.yaml` was cut short, given an extra key or emptied: one line naming the file and
    what is wrong, for a resume and for a report alike."""
    from visionpeft.sweep.spec import make_spec, save_spec

    out = tmp_path / "sweep"
    out.mkdir()
    save_spec(make_spec(DIGITS, {"vpt": {"optim.lr": [0.1, 0.2]}}, ["digits"], [0], "holdout", "final", []), out)
    saved = out / "sweep.yaml"
    text = saved.read_text()
    saved.write_text(
        {"truncated": text[: text.index("tasks:")], "extended": text + "extra: 1\n", "emptied": ""}[damage]
    )
    expected = {"truncated": "lacks 'tasks'", "extended": "unknown key 'extra'", "emptied": "must be a mapping"}[damage]
    for args in ([out], [out, "--report"]):
        code, _, err = sweep(args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(f"error: {saved}"), err
        assert expected in err


def test_an_out_that_is_a_file_is_refused_before_the_configs_are_checked(tmp_path, capsys, monkeypatch):
    """`--out` naming a file: one line before any grid point's config is loaded."""
    from visionpeft.sweep import driver

    checked = []
    monkeypatch.setattr(driver, "check_configs", lambda *a: checked.append(a))
    blocker = tmp_path / "results.txt"
    blocker.write_text("mine")
    code, _, err = sweep([DIGITS, "--grid", write_grid(tmp_path, "g", GRID), "--out", blocker], capsys)
    assert code == 2 and err.strip() == f"error: --out {blocker} is a file, not a folder (the sweep folder)"
    assert checked == [] and blocker.read_text() == "mine"
