"""A real sweep: the 2 x 2 grid of the digits demo on 2 local workers (two optimizer steps a run), the protocol's
choice, an interrupted sweep resumed, a failed run recorded while the sweep goes on."""

from __future__ import annotations

import json

import pytest
from _sweep_utils import DIGITS, FAST, sweep, write_grid

from visionpeft.sweep import executors
from visionpeft.sweep.plan import select_runs
from visionpeft.sweep.runs import execute, status
from visionpeft.sweep.spec import load_saved_spec

pytestmark = pytest.mark.slow  # every test here drives a sweep end to end


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The sweep, run once for the tests of this module (capsys is per test, so the command is called directly)."""
    tmp = tmp_path_factory.mktemp("sweep")
    grid = write_grid(tmp, "vpt", "optim.lr: [0.02, 0.001]\nmethod.num_tokens: [2, 4]\n")
    from visionpeft.cli.common import run
    from visionpeft.cli.sweep import main

    out = tmp / "sweep"
    with pytest.MonkeyPatch.context() as patch:  # as if this machine had GPUs 4 and 7: one per worker
        patch.setattr(executors, "_visible_gpus", lambda: ["4", "7"])
        code = run(
            main,
            [str(DIGITS), *FAST, "--grid", str(grid), "--protocol", "holdout", "--workers", "2", "--out", str(out)],
        )
    return code, out


def _results(out, stage):
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob(f"runs/digits/vpt/{stage}-*/result.json")}


def test_two_by_two_sweep_on_two_workers_chooses_the_best_val_point(finished):
    code, out = finished
    assert code == 0
    select, final = _results(out, "select"), _results(out, "final")
    assert len(select) == 4 and len(final) == 1
    assert {r["gpus"] for r in [*select.values(), *final.values()]} <= {"4", "7"}  # CUDA_VISIBLE_DEVICES per worker
    best = max(select.values(), key=lambda r: r["val"]["top1"])
    (chosen,) = final.values()
    assert chosen["choices"] == best["choices"] and chosen["seed"] == 0
    assert chosen["test"]["top1"] > 0.1 and chosen["val"] == {}  # stage 2 trained on train+val, tested on test
    config = (next(out.glob("runs/digits/vpt/final-*")) / "train" / "config.yaml").read_text()
    assert "train_split: trainval" in config and "test_split: test" in config and "val_split: null" in config
    summary = (out / "summary.md").read_text()
    assert "| vpt | " in summary and f"{100 * chosen['test']['top1']:.1f}" in summary
    assert (out / "accuracy_vs_params.png").stat().st_size > 1000


def test_a_sweep_stopped_after_stage_1_runs_only_stage_2_when_started_again(finished, capsys):
    _, out = finished
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/digits/vpt/select-*/result.json")}
    final = next(out.glob("runs/digits/vpt/final-*"))
    (final / "result.json").unlink()  # as if killed while stage 2 was training: its folder is partial
    assert (final / "train" / "config.yaml").is_file() and status(final) == "pending"
    code, text, _ = sweep([out, "--executor", "slurm", "--slurm.cluster", "debug"], capsys)  # in-process: quicker
    assert code == 0
    assert "stage select: 4 runs, 4 finished before, 0 to run" in text
    assert "stage final: 1 runs, 0 finished before, 1 to run" in text
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/digits/vpt/select-*/result.json")} == before
    assert status(final) == "done"
    code, text, _ = sweep([out], capsys)  # finished: nothing runs
    assert code == 0 and "stage final: 1 runs, 1 finished before, 0 to run" in text
    code, text, _ = sweep([out, "--report"], capsys)  # the report alone, from the folder
    assert code == 0 and f"wrote {out / 'summary.md'}" in text and "| vpt | " in text and "to run" not in text


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    grid = write_grid(tmp_path, "vpt", "data.name: [digits, vtab-dtd]\n")  # VTAB data needs data.root: it fails
    out = tmp_path / "sweep"
    code, text, _ = sweep(
        [DIGITS, *FAST, "--grid", grid, "--executor", "slurm", "--slurm.cluster", "debug", "--out", out], capsys
    )
    assert code == 1  # the sweep finished; one run failed
    assert select_runs(load_saved_spec(out), out) == []  # protocol none: no selection
    assert sorted(status(p) for p in out.glob("runs/digits/vpt/final-*")) == ["done", "failed"]
    failed = next(p for p in out.glob("runs/digits/vpt/*") if status(p) == "failed")
    error = (failed / "error.txt").read_text()
    assert error.startswith("DataError: vtab-dtd needs data.root (the folder holding dtd/)") and error.count("\n") == 1
    assert "Traceback" in (failed / "traceback.txt").read_text()
    assert "failed: digits/vpt final seed 0 [data.name=vtab-dtd]: DataError: vtab-dtd needs data.root" in text
    assert "## Failed runs" in (out / "summary.md").read_text()
    record = execute(json.loads((failed / "run.json").read_text()))  # run again: it fails again, the same way
    assert record["status"] == "failed" and record["error"] == error.strip()


def test_more_seeds_extend_a_finished_sweep_and_reuse_its_runs(finished, tmp_path, capsys):
    import shutil

    _, done = finished
    out = tmp_path / "sweep"
    shutil.copytree(done, out)
    grid = done.parent / "vpt.yaml"
    args = [DIGITS, *FAST, "--grid", grid, "--protocol", "holdout", "--out", out]
    code, _, err = sweep([*args, "--seeds", "1", "0"], capsys)  # the select stage's seed would change
    assert code == 2 and "holds another sweep" in err and "extend it with more seeds (after its own)" in err
    before = {p.name for p in out.glob("runs/digits/vpt/*")}
    code, text, _ = sweep([*args, "--seeds", "0", "1", "--executor", "slurm", "--slurm.cluster", "debug"], capsys)
    assert code == 0 and "extending the sweep in" in text and "seeds [0] -> [0, 1]" in text
    assert "stage select: 4 runs, 4 finished before, 0 to run" in text
    assert "stage final: 2 runs, 1 finished before, 1 to run" in text
    finals = sorted(json.loads(p.read_text())["seed"] for p in out.glob("runs/digits/vpt/final-*/result.json"))
    assert finals == [0, 1] and before < {p.name for p in out.glob("runs/digits/vpt/*")}
    assert load_saved_spec(out).seeds == [0, 1]


def test_a_run_folder_another_worker_holds_is_left_alone(tmp_path):
    """A run whose folder another worker holds (an earlier driver's, still training): the worker says who holds it
    and neither clears nor trains it; once the holder is gone, the run trains."""
    from visionpeft.locks import FolderLock
    from visionpeft.sweep.plan import final_runs
    from visionpeft.sweep.runs import RUN_LOCK
    from visionpeft.sweep.spec import make_spec

    spec = make_spec(DIGITS, {"vpt": {}}, ["digits"], [0], "none", "final", FAST)
    (run,) = final_runs(spec, tmp_path)
    (run.path / "train").mkdir(parents=True)
    (run.path / "log.txt").write_text("the other worker's log\n")
    with FolderLock(run.path, RUN_LOCK, "a sweep worker"):
        record = execute(run)
        assert record["status"] == "failed" and record["error"].startswith(f"{run.path} is in use by a sweep worker")
        assert (run.path / "log.txt").read_text() == "the other worker's log\n" and status(run.path) == "pending"
    assert execute(run)["status"] == "done"
