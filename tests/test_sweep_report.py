"""The report, on a faked VTAB-1k result set: chosen points, group means, published numbers side by side."""

from __future__ import annotations

import csv
import json

import pytest
from _sweep_utils import ROOT, VTAB_CONFIG

from visionpeft.sweep.plan import final_runs, select_runs
from visionpeft.sweep.report import write_report
from visionpeft.sweep.spec import make_spec
from visionpeft.sweep.tasks import VTAB_GROUPS

WINNER = 5  # the grid point every task's stage 1 makes best
# stage 2 test top-1 per group, for seeds 0 and 1: Natural 85 +- 7.1, Specialized 60, Structured 45
TOP1 = {"Natural": (0.80, 0.90), "Specialized": (0.60, 0.60), "Structured": (0.40, 0.50)}


def _fake(folder, record: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"trainable": 1_179_648 + 768, "head": 768, **record}))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    spec = make_spec(VTAB_CONFIG, {"lora": ROOT / "grids" / "lora.yaml"}, ["vtab"], [0, 1], "vtab1k", "final", [])
    for index, run in enumerate(select_runs(spec, root)):
        _fake(run.path, {"val": {"top1": 0.9 if index % 16 == WINNER else 0.5}, "test": {}})
    group = {task: name for name, tasks in VTAB_GROUPS.items() for task in tasks}
    for run in final_runs(spec, root):
        _fake(run.path, {"test": {"top1": TOP1[group[run.task]][run.seed]}})
    write_report(spec, root)
    return spec, root


@pytest.mark.slow
def test_group_means_and_the_19_task_mean(sweep_dir):
    _, root = sweep_dir
    rows = {r["task"]: r for r in csv.DictReader(open(root / "summary.csv"))}
    assert float(rows["caltech101"]["top1_mean"]) == 85.0 and float(rows["caltech101"]["top1_std"]) == 7.07
    assert float(rows["Natural"]["top1_mean"]) == 85.0
    assert float(rows["Specialized"]["top1_mean"]) == 60.0
    assert float(rows["Structured"]["top1_mean"]) == 45.0
    assert float(rows["group mean"]["top1_mean"]) == pytest.approx((85 + 60 + 45) / 3, abs=0.01)
    assert float(rows["mean"]["top1_mean"]) == pytest.approx((7 * 85 + 4 * 60 + 8 * 45) / 19, abs=0.01)


def test_published_numbers_sit_beside_ours_with_the_difference(sweep_dir):
    _, root = sweep_dir
    rows = {r["task"]: r for r in csv.DictReader(open(root / "summary.csv"))}
    assert float(rows["caltech101"]["published"]) == 91.4  # PETL_Vision's final_result.json for caltech101 LoRA
    assert float(rows["caltech101"]["difference"]) == pytest.approx(85.0 - 91.4)
    assert float(rows["mean"]["published"]) == pytest.approx(72.91, abs=0.01)  # their 19-task LoRA mean
    text = (root / "summary.md").read_text()
    assert "85.0 ± 7.1 [91.4, -6.4]" in text and "62.9 [72.9, -10.0]" in text
    row = next(line for line in text.splitlines() if "85.0 ± 7.1" in line)
    assert row.startswith("| lora | ")  # the grid's label, not the last summary column's name


def test_the_chosen_point_is_the_best_on_val_and_is_reported_per_task(sweep_dir):
    spec, root = sweep_dir
    chosen = spec.points("lora")[WINNER].describe()
    assert chosen == (  # point 5 of 4 (lr x wd) x 4 (rank): lr 0.001, wd 0.001, rank 8
        "optim.lr=0.001, optim.weight_decay=0.001, "
        "method={alpha: 8, dropout: 0.1, name: lora, r: 8, target_modules: [qkv]}"
    )
    text = (root / "summary.md").read_text()
    assert text.count(f"| {chosen} |") == 19
    assert "| lora | caltech101 | " + chosen + " | lora_bottleneck=32, lr=0.001, wd=0.001 |" in text  # their choice


def test_a_task_with_a_missing_seed_shows_it_and_leaves_its_group_mean_out(sweep_dir, tmp_path):
    spec, root = sweep_dir
    run = next(r for r in final_runs(spec, root) if r.task == "dmlab" and r.seed == 1)
    (run.path / "result.json").rename(tmp_path / "kept.json")
    try:
        write_report(spec, root)
        rows = {r["task"]: r for r in csv.DictReader(open(root / "summary.csv"))}
        assert rows["dmlab"]["state"] == "1/2 seeds" and float(rows["dmlab"]["top1_mean"]) == 40.0
        assert rows["Structured"]["top1_mean"] == "" and rows["mean"]["top1_mean"] == ""
        assert float(rows["Natural"]["top1_mean"]) == 85.0
    finally:
        (tmp_path / "kept.json").rename(run.path / "result.json")
        write_report(spec, root)


def _small_spec(select: str):
    from _sweep_utils import DIGITS

    return make_spec(DIGITS, {"vpt": {"optim.lr": [0.1, 0.01, 0.001]}}, ["digits"], [0], "holdout", select, [])


@pytest.mark.parametrize(("select", "chosen"), [("final", "optim.lr=0.01"), ("best", "optim.lr=0.1")])
def test_selection_by_final_or_best_val_top1_and_failed_points_are_never_chosen(tmp_path, select, chosen):
    from visionpeft.sweep.plan import choose

    spec = _small_spec(select)
    first, second, third = select_runs(spec, tmp_path)
    _fake(first.path, {"val": {"top1": 0.5}, "best_val_top1": 0.95})  # peaked early, ended low
    _fake(second.path, {"val": {"top1": 0.7}, "best_val_top1": 0.7})
    assert choose(spec, tmp_path, "digits", "vpt") == (None, 1)  # one point still pending: no choice yet
    assert final_runs(spec, tmp_path) == []
    third.path.mkdir(parents=True)
    (third.path / "error.txt").write_text("RuntimeError: out of memory\n")  # failed: not a candidate
    point, pending = choose(spec, tmp_path, "digits", "vpt")
    assert pending == 0 and point.describe() == chosen
    (run,) = final_runs(spec, tmp_path)
    assert run.stage == "final" and "data.train_split=trainval" in run.overrides and run.choices == point.choices


def _grid_sweep(root):
    """A finished 2 x 2 grid of the digits demo under protocol none, three seeds (faked results)."""
    from _sweep_utils import DIGITS

    spec = make_spec(
        DIGITS,
        {"vpt": {"optim.lr": [0.02, 0.001], "method.num_tokens": [2, 4]}},
        ["digits"],
        [0, 1, 2],
        "none",
        "final",
        [],
    )
    for index, run in enumerate(final_runs(spec, root)):
        tokens = int(dict(run.choices)["method.num_tokens"])
        _fake(run.path, {"test": {"top1": 0.6 + 0.01 * index}, "trainable": 11_146 * tokens + 170, "head": 170})
    return spec


def _shown_tick_labels(axis) -> list:
    """The tick labels an axis draws (those of ticks inside its view; matplotlib keeps others undrawn)."""
    low, high = sorted(axis.get_view_interval())
    return [t.label1 for t in axis.get_major_ticks() if low <= t.get_loc() <= high and t.label1.get_text()]


def _texts_outside(fig) -> list[str]:
    """The drawn texts of a figure that reach past its edges, and x tick labels that overlap a neighbour."""
    fig.canvas.draw()
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    ticks = {id(t) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) for t in axis.get_ticklabels()}
    shown = [t for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) for t in _shown_tick_labels(axis)]
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and a.get_visible() and a.get_text())]
    wrong = []
    for text in [t for t in texts if id(t) not in ticks] + shown:
        extent = text.get_window_extent(renderer)
        if extent.x0 < box.x0 - 1 or extent.x1 > box.x1 + 1 or extent.y0 < box.y0 - 1 or extent.y1 > box.y1 + 1:
            wrong.append(text.get_text())
    for ax in fig.axes:
        extents = sorted((t.get_window_extent(renderer) for t in _shown_tick_labels(ax.xaxis)), key=lambda e: e.x0)
        wrong += [f"ticks overlap at x={a.x1:.0f}" for a, b in zip(extents, extents[1:]) if a.x1 > b.x0]
    return wrong


def test_the_plot_keeps_every_label_inside_and_draws_published_markers_only_where_they_exist(tmp_path, sweep_dir):
    """The sweep plot of a 2 x 2 grid: no title, point label or tick label past the picture's edges or over a
    neighbour (the rows are named in a legend below the panels); hollow "published" markers and their legend entry
    appear only where published numbers exist (VTAB-1k LoRA), and no title promises them."""
    import matplotlib.pyplot as plt

    from visionpeft.sweep.report import collect, figure

    spec = _grid_sweep(tmp_path)
    fig = figure(spec, collect(spec, tmp_path))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert _texts_outside(fig) == [] and not any(len(ax.texts) for ax in fig.axes)
    assert len(legend) == 4 and "published" not in legend and "published" not in fig.get_suptitle()
    plt.close(fig)
    vtab, root = sweep_dir
    fig = figure(vtab, collect(vtab, root))
    assert "published" in [t.get_text() for t in fig.legends[0].get_texts()] and _texts_outside(fig) == []
    plt.close(fig)


def test_the_summary_says_what_each_protocol_does(tmp_path, sweep_dir):
    """`summary.md` states the protocol's real procedure: under `none` nothing is chosen (no "select by the val
    top-1"), under `vtab1k` the points are scored on val200 by the chosen statistic."""
    spec = _grid_sweep(tmp_path)
    write_report(spec, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "protocol `none` (every grid point trained on the config's own splits and tested; nothing chosen)" in text
    assert "select by" not in text and "val top-1" not in text.splitlines()[2]
    _, root = sweep_dir
    assert "scored by its final top-1 on val200" in (root / "summary.md").read_text()


def test_the_zoo_grids_and_noah_show_their_published_numbers_and_choices(tmp_path):
    """Grids whose label is not PETL_Vision's method name (adapter_houlsby = rand_h_adapter, ln_tune = ln) and NOAH
    (its paper's numbers) get their published numbers beside ours, their sources named, their choices listed."""
    grids = {name: ROOT / "grids" / f"{name}.yaml" for name in ("adapter_houlsby", "ln_tune")}
    spec = make_spec(VTAB_CONFIG, {**grids, "noah": {}}, ["caltech101"], [0], "vtab1k", "final", [])
    for index, run in enumerate(select_runs(spec, tmp_path)):
        _fake(run.path, {"val": {"top1": 0.9 if index in (5, 64) else 0.5}, "test": {}})
    for run in final_runs(spec, tmp_path):
        _fake(run.path, {"test": {"top1": 0.9}})
    write_report(spec, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    table = text.split("## Chosen")[0].splitlines()
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table if line.startswith("| ")}
    assert "90.0 [92.1, -2.1]" in rows["adapter_houlsby"]  # rand_h_adapter's caltech101: 92.07
    assert "90.0 [89.2, +0.8]" in rows["ln_tune"]  # ln's caltech101: 89.2
    assert "90.0 [92.7, -2.7]" in rows["noah"]  # the NOAH paper's Table 1
    assert "(PETL_Vision's re-tuned VTAB-1k runs; the NOAH paper's Table 1, see" in text
    assert "adapter_bottleneck=8, adapter_scaler=1, lr=0.001, wd=0.0001 |" in text  # their choice on caltech101
