"""Base-to-new (CoCoOp's protocol) in the trainer and the sweep, on a tiny CLIP built from its config: a run on the
base half of the classes is also tested on the new half with its learned prompts; a base-to-new sweep reports base,
new and the harmonic mean per method."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
import yaml
from _sweep_utils import sweep
from safetensors.torch import load_file
from test_tiny_clip import open_clip_folder

import visionpeft as vp
from visionpeft.config import load_config
from visionpeft.data.fewshot import base_new_split
from visionpeft.data.mini import digits
from visionpeft.data.transforms import build_transform, data_config_of
from visionpeft.sweep.plan import final_runs
from visionpeft.sweep.report import write_report
from visionpeft.sweep.spec import SPEC_FILE, load_saved_spec, make_spec
from visionpeft.tasks.clip_classifier import CLIPClassifier
from visionpeft.trainers.classification import run as train

CONFIG = """
model: {{library: open_clip, name: {folder}, clip_head: prompts}}
method: {{name: coop, n_ctx: 2}}
data: {{name: digits, img_size: 32, batch_size: 16, eval_batch_size: 64, num_workers: 0, shots: 2,
        train_split: train, val_split: null, test_split: test}}
optim: {{name: sgd, lr: 0.05, epochs: null, steps: 2, warmup_epochs: null, warmup_steps: 0}}
train: {{output_dir: {runs}, seed: 0}}
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("b2n")
    path = tmp / "coop_tiny.yaml"
    path.write_text(CONFIG.format(folder=open_clip_folder(tmp / "clip"), runs=tmp / "runs"))
    return path


def test_a_base_run_is_tested_on_the_new_classes_with_its_learned_context(config_file, tmp_path):
    """Reference: CoOp attached for the 5 new digits with the trained context copied in by hand from the saved
    adapter; its mean cross-entropy and top-1 on the new digits' test images equal the run's ``test_new``."""
    config = load_config(config_file, ["data.class_split=base", f"train.output_dir={tmp_path}"])
    results = train(config, tmp_path / "coop", cpu=True)
    assert set(results["test"]) == set(results["test_new"]) == {"top1", "top5", "loss"}
    new = base_new_split(digits("test"), "new")
    assert list(new.classes) == ["5", "6", "7", "8", "9"]
    clip = vp.attach(CLIPClassifier(_clip(config), list(new.classes)), "coop", classnames=list(new.classes), n_ctx=2)
    (key,) = [k for k in load_file(tmp_path / "coop" / "last" / "visionpeft_adapter.safetensors") if "ctx" in k]
    trained_ctx = load_file(tmp_path / "coop" / "last" / "visionpeft_adapter.safetensors")[key]
    (ctx,) = [p for _, p in vp.trainable_parameters(clip)]
    with torch.no_grad():
        ctx.copy_(trained_ctx)
    transform = build_transform(32, data_config_of(clip), train=False)
    images = torch.stack([transform(new[i][0]) for i in range(len(new))])
    labels = torch.tensor([new[i][1] for i in range(len(new))])
    with torch.no_grad():
        logits = clip.eval()(images)
    assert results["test_new"]["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert results["test_new"]["top1"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert not torch.equal(trained_ctx, _initial_ctx(config))  # the trained context, not the initial one


def _clip(config):
    from visionpeft.backbones.factory import create_open_clip

    return create_open_clip(config.model)


def _initial_ctx(config):
    torch.manual_seed(0)
    model = vp.attach(CLIPClassifier(_clip(config), ["a", "b"]), "coop", classnames=["a", "b"], n_ctx=2)
    return next(p for _, p in vp.trainable_parameters(model)).detach()


def test_a_class_bound_model_has_no_new_class_test_and_says_why(config_file, tmp_path, caplog):
    overrides = ["data.class_split=base", "model.clip_head=linear", "method=linear", f"train.output_dir={tmp_path}"]
    with caplog.at_level(logging.WARNING, logger="visionpeft"):
        results = train(load_config(config_file, overrides), tmp_path / "linear", cpu=True)
    assert "test" in results and "test_new" not in results
    assert (
        "base-to-new: no new-class test (its linear head (model.clip_head=linear) has a weight row per" in caplog.text
    )


@pytest.mark.slow
def test_a_base_to_new_sweep_reports_base_new_and_their_harmonic_mean(config_file, tmp_path, capsys):
    spec_file = tmp_path / "b2n.yaml"
    spec_file.write_text(f"""
config: {config_file}
base_to_new: true
tasks: [digits]
seeds: [0, 1]
grids:
  coop: {{}}
  linear: {{method: linear, model.clip_head: linear}}
""")
    out = tmp_path / "sweep"
    code, printed, _ = sweep([spec_file, "--out", out], capsys)
    assert code == 0, printed
    results = {}
    for label in ("coop", "linear"):
        folders = sorted(out.glob(f"runs/digits/{label}/final-*"))
        assert len(folders) == 2
        assert all("data.class_split=base" in json.loads((f / "run.json").read_text())["overrides"] for f in folders)
        results[label] = [json.loads((f / "result.json").read_text()) for f in folders]
    assert all(r["test_new"] == {} for r in results["linear"])
    base = [100 * r["test"]["top1"] for r in results["coop"]]
    new = [100 * r["test_new"]["top1"] for r in results["coop"]]
    mean_base, mean_new = sum(base) / 2, sum(new) / 2
    hm = 2 * mean_base * mean_new / (mean_base + mean_new)
    summary = (out / "summary.md").read_text()
    coop_row = next(line for line in summary.splitlines() if line.startswith("| coop |"))
    cells = [c.strip() for c in coop_row.split("|")[3:6]]
    assert cells[0].startswith(f"{mean_base:.1f} ± ") and cells[1].startswith(f"{mean_new:.1f} ± ")
    assert cells[2] == f"{hm:.1f}"
    linear_row = next(line for line in summary.splitlines() if line.startswith("| linear |"))
    assert [c.strip() for c in linear_row.split("|")[4:6]] == ["-", "-"]
    assert "## digits" in summary and "| method | params (M) | base | new | HM |" in summary
    rows = {r["method"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert float(rows["coop"]["hm"]) == pytest.approx(hm, abs=0.01) and rows["linear"]["new_mean"] == ""
    assert load_saved_spec(out).base_to_new is True


def _fake(run, base: float, new: float | None) -> None:
    run.path.mkdir(parents=True)
    record = {"trainable": 100, "head": 0, "test": {"top1": base}, "test_new": {} if new is None else {"top1": new}}
    (run.path / "result.json").write_text(json.dumps(record))


def test_the_average_table_is_the_mean_of_the_tasks_means_and_the_hm_of_the_averages(config_file, tmp_path):
    """CoCoOp's "Average over N datasets": base and new averaged over the tasks, H of the two averages."""
    spec = make_spec(config_file, {"coop": {}}, ["digits", "textures"], [0, 1], "none", "final", [], True)
    values = {
        ("digits", 0): (0.8, 0.5),
        ("digits", 1): (0.6, 0.3),
        ("textures", 0): (0.5, 0.2),
        ("textures", 1): (0.5, 0.4),
    }
    for run in final_runs(spec, tmp_path):
        _fake(run, *values[run.task, run.seed])
    write_report(spec, tmp_path)
    lines = (tmp_path / "summary.md").read_text().splitlines()
    average = lines.index("## Average over 2 tasks")
    assert lines[average + 4] == "| coop | 0.000 | 60.0 | 35.0 | 44.2 |"  # (70 + 50) / 2, (40 + 30) / 2, H(60, 35)
    digits_table = lines.index("## digits")
    assert lines[digits_table + 4] == "| coop | 0.000 | 70.0 ± 14.1 | 40.0 ± 14.1 | 50.9 |"


def test_the_spec_carries_base_to_new_into_every_run_and_older_sweep_folders_load(config_file, tmp_path):
    spec = make_spec(config_file, {"coop": {}}, ["digits"], [0], "holdout", "final", [], True)
    (run,) = final_runs(spec, tmp_path)
    assert run.overrides[-2:] == ("data.class_split=base", "train.seed=0")
    plain = make_spec(config_file, {"coop": {}}, ["digits"], [0], "holdout", "final", [])
    (plain_run,) = final_runs(plain, tmp_path)
    assert "data.class_split=base" not in plain_run.overrides and plain_run.path != run.path
    folder = tmp_path / "old"
    folder.mkdir()
    saved = {k: v for k, v in asdict(plain).items() if k != "base_to_new"}  # a sweep.yaml from before the key
    (folder / SPEC_FILE).write_text(yaml.safe_dump(saved))
    assert load_saved_spec(folder) == plain


def test_a_base_to_new_value_that_is_not_a_boolean_is_one_line(config_file, tmp_path, capsys):
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(f"config: {config_file}\ngrids: {{coop: {{}}}}\nbase_to_new: 'yes'\n")
    code, _, err = sweep([spec_file, "--out", tmp_path / "out", "--dry-run"], capsys)
    assert code == 2
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith(
            f"sweep spec {spec_file}: 'base_to_new' must be true or false "
            "(CoCoOp's base-to-new: train on the base half of each task's "
            "classes, test on base and new), got 'yes'"
        )
    )


def test_the_command_line_flag_makes_a_base_to_new_sweep_in_its_own_folder(config_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, printed, _ = sweep([config_file, "--base-to-new", "--dry-run"], capsys)
    assert code == 0
    (line,) = [line for line in printed.splitlines() if "final-s0-" in line]
    assert "runs/sweeps/coop_tiny-base2new/runs/digits/coop_tiny/final-s0-" in line
    code, plain, _ = sweep([config_file, "--dry-run"], capsys)
    (plain_line,) = [line for line in plain.splitlines() if "final-s0-" in line]
    assert "runs/sweeps/coop_tiny/runs/digits/coop_tiny/final-s0-" in plain_line
    assert line.rsplit("-", 1)[1] != plain_line.rsplit("-", 1)[1]  # another run: its overrides differ


def test_the_shipped_clip_spec_is_a_base_to_new_sweep_of_the_prompt_learners(tmp_path):
    from _sweep_utils import ROOT

    from visionpeft.sweep.spec import load_spec_file

    spec = load_spec_file(ROOT / "grids" / "demo_clip_base2new.yaml")
    assert (
        spec.base_to_new
        and spec.tasks == ["clip_mix"]
        and list(spec.grids)
        == [
            "coop",
            "cocoop",
            "kgcoop",
            "maple",
            "linear",
        ]
    )
    runs = final_runs(spec, tmp_path)
    assert len(runs) == 15 and all("data.class_split=base" in run.overrides for run in runs)
