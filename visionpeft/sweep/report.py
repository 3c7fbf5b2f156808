"""The sweep report, from whatever has finished: ``summary.md``, ``summary.csv`` and ``accuracy_vs_params.png``.

Each cell is the final stage's test top-1 (%), mean +- std over the finished seeds, with the published number and
the difference beside it where one exists (:mod:`.published`). For VTAB-1k tasks the Natural / Specialized /
Structured means (each over its tasks), the group mean (mean of the three) and the mean over the 19 tasks follow;
a mean is shown only when all of its tasks have a result.

A base-to-new sweep (``base_to_new: true``) shows CoCoOp's tables instead: per task (and averaged over the tasks)
each row's base and new top-1 and the harmonic mean of their means; its CSV has the new classes' columns too.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..io import shown_path
from ..metrics.base_to_new import harmonic_mean
from .grid import Point
from .plan import choose, has_select_stage, make_run
from .protocol import PROTOCOLS, describe
from .published import SOURCES, published
from .runs import read_error, read_result, status
from .spec import SweepSpec
from .tasks import VTAB_GROUPS, VTAB_TASKS


@dataclass
class Cell:
    """One (task, row): the chosen point and the final stage's results so far. A row is a grid (its label), or one
    point of a grid under a protocol that chooses nothing."""

    task: str
    label: str
    row: str
    top1: list[float] = field(default_factory=list)  # percent, one per finished seed
    new: list[float] = field(default_factory=list)  # base-to-new: the new classes' top-1, per seed that has it
    trainable: int | None = None
    head: int = 0
    chosen: str = ""
    state: str = ""  # what is missing, if anything
    published: dict | None = None

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.top1) if self.top1 else None


def rows(spec: SweepSpec) -> list[tuple[str, str, Point | None]]:
    """``(row name, grid label, point)`` of the report: a grid per row whose point stage 1 chooses (point None), or
    a row per point of a grid when the protocol chooses nothing."""
    if PROTOCOLS[spec.protocol].select is not None:
        return [(label, label, None) for label in spec.grids]
    out = []
    for label in spec.grids:
        points = spec.points(label)
        out += [(label if len(points) == 1 else f"{label} [{p.describe()}]", label, p) for p in points]
    return out


def collect(spec: SweepSpec, root: Path) -> list[Cell]:
    """The cells of every (row, task), in the spec's order."""
    table = published()
    cells = []
    for row, label, point in rows(spec):
        for task in spec.tasks:
            cell = Cell(task, label, row, published=table.get((label, task)))
            if point is None:
                point_of_task, pending = choose(spec, root, task, label)
                if point_of_task is None:
                    cell.state = f"selecting ({pending} pending)" if pending else "no stage-1 run succeeded"
                    cells.append(cell)
                    continue
                cell.chosen = point_of_task.describe() if has_select_stage(spec, label) else ""
            failed = 0
            for seed in spec.seeds:
                run = make_run(spec, root, task, label, point or point_of_task, "final", seed)
                result = read_result(run.path)
                failed += status(run.path) == "failed"
                if result is not None and "top1" in (result.get("test") or {}):
                    cell.top1.append(100 * result["test"]["top1"])
                    cell.trainable, cell.head = result.get("trainable"), result.get("head") or 0
                    if "top1" in (result.get("test_new") or {}):
                        cell.new.append(100 * result["test_new"]["top1"])
            missing = len(spec.seeds) - len(cell.top1)
            if missing:
                cell.state = f"{len(cell.top1)}/{len(spec.seeds)} seeds" + (f", {failed} failed" if failed else "")
            cells.append(cell)
    return cells


def _row_names(cells: list[Cell]) -> list[str]:
    return list(dict.fromkeys(c.row for c in cells))


def group_means(values: dict[str, float]) -> dict[str, float]:
    """Natural / Specialized / Structured means, ``group mean`` (of the three) and ``mean`` (of the 19 tasks), for
    those whose tasks all have a value."""
    out = {}
    for group, tasks in VTAB_GROUPS.items():
        if all(t in values for t in tasks):
            out[group] = statistics.fmean(values[t] for t in tasks)
    if len(out) == len(VTAB_GROUPS):
        out["group mean"] = statistics.fmean(out[g] for g in VTAB_GROUPS)
    if all(t in values for t in VTAB_TASKS):
        out["mean"] = statistics.fmean(values[t] for t in VTAB_TASKS)
    return out


def _summaries(spec: SweepSpec) -> list[str]:
    """The summary columns this sweep can fill: VTAB groups when it has VTAB tasks, else the mean over its tasks."""
    if any(t in VTAB_TASKS for t in spec.tasks):
        return [*VTAB_GROUPS, "group mean", "mean"]
    return ["mean"] if len(spec.tasks) > 1 else []


def summary_values(spec: SweepSpec, values: dict[str, float]) -> dict[str, float]:
    if any(t in VTAB_TASKS for t in spec.tasks):
        return group_means(values)
    if len(spec.tasks) > 1 and all(t in values for t in spec.tasks):
        return {"mean": statistics.fmean(values[t] for t in spec.tasks)}
    return {}


def _spread(values: list[float]) -> str:
    """``mean ± std`` of the seeds' values (the mean alone for one seed)."""
    return f"{statistics.fmean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def _cell_text(cell: Cell) -> str:
    if not cell.top1:
        text = cell.state or "-"
    else:
        text = _spread(cell.top1)
        text += f" ({cell.state})" if cell.state else ""
    if cell.published:
        pub = cell.published["top1"]
        text += f" [{pub:.1f}" + (f", {cell.mean - pub:+.1f}]" if cell.mean is not None else "]")
    return text


def _params(cells: list[Cell]) -> str:
    counts = [c.trainable - c.head for c in cells if c.trainable is not None]
    return f"{statistics.fmean(counts) / 1e6:.3f}" if counts else "-"


def _sources(cells: list[Cell]) -> str:
    """The sources of the published numbers the report shows, in words (every source when it shows none)."""
    shown = {c.published["source"] for c in cells if c.published}
    return "; ".join(text for key, text in SOURCES.items() if not shown or key in shown)


def markdown(spec: SweepSpec, root: Path, cells: list[Cell]) -> str:
    summaries = _summaries(spec)
    runs = [p for p in root.glob("runs/*/*/*") if p.is_dir()]
    states = [status(p) for p in runs]
    sizes = {g: len(spec.points(g)) for g in spec.grids}
    grids = ", ".join(f"{g} ({n} point{'s' if n > 1 else ''})" for g, n in sizes.items())
    lines = [
        f"# Sweep report: {root.name}",
        "",
        f"Config `{shown_path(spec.config)}`; protocol `{spec.protocol}` ({describe(spec.protocol, spec.select)}); "
        f"seeds {', '.join(map(str, spec.seeds))}; grids {grids}.",
        f"Run folders: {states.count('done')} finished, {states.count('failed')} failed, "
        f"{states.count('pending')} started and unfinished.",
        "",
    ]
    if spec.base_to_new:
        return "\n".join(lines + base_to_new_tables(spec, cells) + _choices_and_failures(root, cells, runs, states))
    lines += [
        "Test top-1 (%) of the final stage, mean ± std over the finished seeds; [published, difference] where a "
        f"published number exists ({_sources(cells)}, see `visionpeft/sweep/published_vtab1k.csv`). "
        "Params: trainable parameters without the task head, in millions.",
        "",
        "| method | params (M) | " + " | ".join([*spec.tasks, *summaries]) + " |",
        "|---|---:|" + "---:|" * (len(spec.tasks) + len(summaries)),
    ]
    for name in _row_names(cells):
        row = [c for c in cells if c.row == name]
        ours = summary_values(spec, {c.task: c.mean for c in row if c.mean is not None and not c.state})
        theirs = summary_values(spec, {c.task: c.published["top1"] for c in row if c.published})
        extra = []
        for column in summaries:
            text = f"{ours[column]:.1f}" if column in ours else "-"
            if column in theirs:
                difference = f", {ours[column] - theirs[column]:+.1f}" if column in ours else ""
                text += f" [{theirs[column]:.1f}{difference}]"
            extra.append(text)
        lines.append(f"| {name} | {_params(row)} | " + " | ".join([*map(_cell_text, row), *extra]) + " |")
    return "\n".join(lines + _choices_and_failures(root, cells, runs, states))


def _choices_and_failures(root: Path, cells: list[Cell], runs: list[Path], states: list[str]) -> list[str]:
    """The report's sections after its table: the points stage 1 chose, the failed runs."""
    lines = []
    chosen = [c for c in cells if c.chosen]
    if chosen:
        lines += [
            "",
            "## Chosen hyper-parameters (stage select)",
            "",
            "| method | task | chosen | published choice |",
            "|---|---|---|---|",
        ]
        for c in chosen:
            theirs = ", ".join(f"{k}={v}" for k, v in (c.published or {}).get("best_tune", {}).items())
            lines.append(f"| {c.row} | {c.task} | {c.chosen} | {theirs or '-'} |")
    failed = [p for p, s in zip(runs, states) if s == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{p.relative_to(root)}`: {read_error(p)}" for p in failed]
    return lines + [""]


def base_to_new_tables(spec: SweepSpec, cells: list[Cell]) -> list[str]:
    """CoCoOp's layout: a table per task (and their average when there are several) with each row's base and new
    top-1 and the harmonic mean of their means; a row without new-class results (a linear head, Tip-Adapter's
    cache) shows base only."""
    lines = [
        "Base-to-new (CoCoOp's protocol): every run trains on the base half of its task's classes "
        "(`data.class_split=base`). Base: test top-1 (%) on the base classes; new: the same adapter given the other "
        "half's class names, on their test images; mean ± std over the finished seeds. HM: the harmonic mean of "
        "the mean base and mean new top-1. Params: trainable parameters without the task head, in millions.",
    ]
    tables = [(task, [task]) for task in spec.tasks]
    if len(spec.tasks) > 1:
        tables.insert(0, (f"Average over {len(spec.tasks)} tasks", spec.tasks))
    for title, tasks in tables:
        lines += ["", f"## {title}", "", "| method | params (M) | base | new | HM |", "|---|---:|---:|---:|---:|"]
        for name in _row_names(cells):
            row = [c for c in cells if c.row == name and c.task in tasks]
            lines.append(f"| {name} | {_params(row)} | " + " | ".join(_base_new_hm(row)) + " |")
    return lines


def _base_new_hm(row: list[Cell]) -> list[str]:
    """Base, new and HM texts of one task's cell, or of several tasks' average (the mean of their means, shown
    only when every task has all its seeds; HM of the averages, as CoCoOp's average table)."""
    if len(row) == 1:
        (cell,) = row
        whole = bool(cell.new) and len(cell.new) == len(cell.top1)
        hm = f"{harmonic_mean(cell.mean, statistics.fmean(cell.new)):.1f}" if whole else "-"
        return [_cell_text(replace(cell, published=None)), _spread(cell.new) if cell.new else "-", hm]
    if not all(c.top1 and not c.state for c in row):
        return ["-", "-", "-"]
    base = statistics.fmean(c.mean for c in row)
    if not all(len(c.new) == len(c.top1) for c in row):
        return [f"{base:.1f}", "-", "-"]
    new = statistics.fmean(statistics.fmean(c.new) for c in row)
    return [f"{base:.1f}", f"{new:.1f}", f"{harmonic_mean(base, new):.1f}"]


def write_csv(spec: SweepSpec, cells: list[Cell], path: Path) -> None:
    """One row per (task, label) and per summary: our mean / std / seeds, the published number, the difference."""
    fields = [
        "method",
        "task",
        "seeds",
        "top1_mean",
        "top1_std",
        "published",
        "difference",
        "trainable",
        "trainable_without_head",
        "chosen",
        "state",
    ]
    fields += ["new_mean", "new_std", "hm"] if spec.base_to_new else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for name in _row_names(cells):
            row = [c for c in cells if c.row == name]
            for c in row:
                pub = c.published["top1"] if c.published else None
                std = statistics.stdev(c.top1) if len(c.top1) > 1 else None
                own = None if c.trainable is None else c.trainable - c.head
                new = {}
                if spec.base_to_new and c.new:
                    new_mean = statistics.fmean(c.new)
                    new = {
                        "new_mean": _round(new_mean),
                        "new_std": _round(statistics.stdev(c.new) if len(c.new) > 1 else None),
                        "hm": _round(harmonic_mean(c.mean, new_mean) if len(c.new) == len(c.top1) else None),
                    }
                writer.writerow(
                    {
                        **new,
                        "method": name,
                        "task": c.task,
                        "seeds": len(c.top1),
                        "top1_mean": _round(c.mean),
                        "top1_std": _round(std),
                        "published": pub,
                        "difference": _round(c.mean - pub if c.mean is not None and pub is not None else None),
                        "trainable": c.trainable,
                        "trainable_without_head": own,
                        "chosen": c.chosen,
                        "state": c.state,
                    }
                )
            ours = summary_values(spec, {c.task: c.mean for c in row if c.mean is not None and not c.state})
            theirs = summary_values(spec, {c.task: c.published["top1"] for c in row if c.published})
            for summary in dict.fromkeys([*ours, *theirs]):
                mine, pub = ours.get(summary), theirs.get(summary)
                writer.writerow(
                    {
                        "method": name,
                        "task": summary,
                        "top1_mean": _round(mine),
                        "published": _round(pub),
                        "difference": _round(mine - pub if mine is not None and pub is not None else None),
                    }
                )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


MARKERS = "osD^vPX*<>"


def _panel_points(cells: list[Cell], finished: list[Cell], panel: str) -> list[tuple[str, float, float, list, dict]]:
    """``(row, x, y, spread, published mean or {})`` of each row with a finished cell in ``panel`` (a task, or the
    mean over tasks)."""
    points = []
    for name in _row_names(cells):
        row = [c for c in finished if c.row == name and panel in (c.task, "mean over tasks")]
        if not row:
            continue
        x = statistics.fmean(max(1, c.trainable - c.head) for c in row)
        y = statistics.fmean(c.mean for c in row)
        spread = [v for c in row for v in c.top1] if len(row) == 1 else [c.mean for c in row]
        pubs = [c.published for c in row if c.published and c.published.get("params")]
        theirs = (
            {"x": statistics.fmean(p["params"] for p in pubs), "y": statistics.fmean(p["top1"] for p in pubs)}
            if pubs
            else {}
        )
        points.append((name, x, y, spread, theirs))
    return points


def _parameter_axis(ax, xs: list[float]) -> None:
    """A log axis when the counts span more than a decade, else a linear one; compact tick labels (``12k``)."""
    from matplotlib.ticker import EngFormatter, MaxNLocator, NullFormatter

    if max(xs) / min(xs) > 10:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.margins(x=0.12, y=0.1)


def figure(spec: SweepSpec, cells: list[Cell]):
    """The plot as a matplotlib figure (None when nothing has finished): test top-1 against trainable parameters
    (head excluded), a panel per task for up to four tasks (two per line), else one panel of the mean over the
    tasks; one colour and marker per row, named in the legend below the panels; a row's published number, where
    one exists, as a hollow marker of its colour. Everything lies inside the figure (constrained layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    finished = [c for c in cells if c.mean is not None and c.trainable is not None]
    if not finished:
        return None
    panels = spec.tasks if len(spec.tasks) <= 4 else ["mean over tasks"]
    columns = min(2, len(panels))
    lines = -(-len(panels) // columns)
    names = _row_names(cells)
    longest = max(len(name) for name in names)
    legend_columns = 2 if len(names) <= 4 and longest <= 30 else 1
    legend_lines = -(-(len(names) + 1) // legend_columns)
    # wide enough for the legend's longest name (about 0.08 inch a character at the default size)
    size = (max(5.2 * columns, 0.08 * longest * legend_columns + 1.2), 3.8 * lines + 0.3 * legend_lines + 0.6)
    fig, axes = plt.subplots(lines, columns, figsize=size, squeeze=False, layout="constrained")
    style = {name: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, name in enumerate(names)}
    published_drawn = False
    for ax, panel in zip(axes.flat, panels):
        points = _panel_points(cells, finished, panel)
        for name, x, y, spread, theirs in points:
            colour, marker = style[name]
            yerr = [[y - min(spread)], [max(spread) - y]]
            ax.errorbar(x, y, yerr=yerr, fmt=marker, color=colour, capsize=3, markersize=7)
            if theirs:
                ax.plot(theirs["x"], theirs["y"], marker, mfc="none", color=colour, markersize=9)
                published_drawn = True
        _parameter_axis(ax, [x for _, x, *_ in points] + [t["x"] for *_, t in points if t])
        ax.set_xlabel("trainable parameters (without head)")
        ax.set_ylabel("base classes' test top-1 (%)" if spec.base_to_new else "test top-1 (%)")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=style[n][0], marker=style[n][1], linestyle="none", label=n) for n in names]
    if published_drawn:
        handles.append(Line2D([], [], color="grey", marker="o", mfc="none", linestyle="none", label="published"))
    fig.legend(handles=handles, loc="outside lower center", ncol=legend_columns)
    bars = "the tasks' means" if panels == ["mean over tasks"] else f"{len(spec.seeds)} seeds"
    spread = f"; bars: range over {bars}" if bars != "1 seeds" else ""
    fig.suptitle(f"Accuracy vs trainable parameters\n({spec.protocol} protocol{spread})")
    return fig


def plot(spec: SweepSpec, cells: list[Cell], path: Path) -> bool:
    """Writes :func:`figure` to ``path``; returns False when nothing has finished."""
    import matplotlib.pyplot as plt

    fig = figure(spec, cells)
    if fig is None:
        return False
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(spec: SweepSpec, root: Path) -> list[Path]:
    """Writes the report files into the sweep folder; returns their paths."""
    cells = collect(spec, root)
    (root / "summary.md").write_text(markdown(spec, root, cells))
    write_csv(spec, cells, root / "summary.csv")
    written = [root / "summary.md", root / "summary.csv"]
    if plot(spec, cells, root / "accuracy_vs_params.png"):
        written.append(root / "accuracy_vs_params.png")
    return written
