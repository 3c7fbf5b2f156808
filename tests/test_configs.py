"""The shipped experiment configs: all load and validate; the flagship one builds the paper's model."""

from __future__ import annotations

import pytest
from _classify_utils import ROOT, write_tiny_cifar100

from visionpeft.config import load_config

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
EXPERIMENTS = [p for p in CONFIGS if "_base_" not in p.parts]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_loads(path):
    from visionpeft.trainers.class_conditional import ClassConditionalConfig
    from visionpeft.trainers.personalization import PersonalizeConfig

    schemas = {"personalize": PersonalizeConfig, "class_conditional": ClassConditionalConfig}
    config = load_config(path, schema_class=next((schemas[p] for p in path.parts if p in schemas), None))
    assert config.train.run_name == path.stem


def test_vtab_covers_the_19_tasks():
    assert len(list((ROOT / "configs" / "vtab").glob("*.yaml"))) == 19


def test_vpt_vitb_cifar_dry_run_builds_vpt_deep_with_the_paper_count(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import train as train_tool
    from _cli import run

    root = write_tiny_cifar100(tmp_path)
    args = [str(ROOT / "configs" / "vpt_vitb_cifar.yaml"), "model.pretrained=false", f"data.root={root}", "--dry-run"]
    assert run(train_tool.main, args) == 0
    out = capsys.readouterr().out
    assert "92,160" in out and "76,900" in out and "data: cifar100, 100 classes" in out
