"""The shipped experiment configs: all load and validate; the flagship one builds the paper's model."""

from __future__ import annotations

import pytest
from _classify_utils import ROOT, write_tiny_cifar100

from visionpeft.config import load_config

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
EXPERIMENTS = [p for p in CONFIGS if "_base_" not in p.parts]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_loads(path):
    config = load_config(path)
    assert config.train.run_name == {"tiny_sd_continue.yaml": "tiny_sd"}.get(path.name, path.stem)
    tasks = {
        "personalize": "personalization",
        "class_conditional": "class_conditional",
        "control": "control",
        "segmentation": "segmentation",
    }
    # configs/pretrain/ and configs/control/ hold several tasks
    by_file = dict.fromkeys(["tiny_sd.yaml", "tiny_sd_continue.yaml", "tiny_flux.yaml"], "pretrain_text_to_image")
    by_file |= dict.fromkeys(
        [
            "ip_adapter_sd15.yaml",
            "ip_adapter_plus_sd15.yaml",
            "ip_adapter_tiny_sd.yaml",
            "ip_adapter_plus_tiny_sd.yaml",
        ],
        "ip_adapter",
    )
    by_file |= {"tiny_clip.yaml": "pretrain_clip"}
    expected = by_file.get(path.name) or next((tasks[p] for p in path.parts if p in tasks), "classification")
    assert config.task == expected


def test_every_schema_field_says_what_it_means():
    import dataclasses

    from visionpeft.registry import TRAINERS

    def undocumented(schema, prefix=""):
        for f in dataclasses.fields(schema):
            if not f.metadata.get("help"):
                yield prefix + f.name
            if dataclasses.is_dataclass(f.type) or isinstance(f.default_factory, type):
                yield from undocumented(f.default_factory, f"{prefix}{f.name}.")

    for name in TRAINERS:
        assert list(undocumented(TRAINERS.get(name).schema)) == [], name


def test_vtab_covers_the_19_tasks():
    assert len(list((ROOT / "configs" / "vtab").glob("*.yaml"))) == 19


def test_convpass_vtab_configs_follow_the_official_per_task_choices():
    from visionpeft.sweep.tasks import VTAB_TASKS

    folder = ROOT / "configs" / "vtab" / "convpass"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(VTAB_TASKS)
    # JieShibo/PETL-ViT convpass/vtab/configs/convpass/*.yaml: (scale, xavier_init) per task, a few of them
    official = {"cifar": (0.1, False), "dsprites_loc": (100, True), "dtd": (0.01, True), "eurosat": (10, False)}
    for task, (scale, xavier) in official.items():
        config = load_config(folder / f"{task}.yaml")
        assert config.data.name == f"vtab-{task}" and config.method.name == "convpass"
        assert (config.method.scale, config.method.xavier_init, config.method.dim) == (scale, xavier, 8)
        assert config.model.drop_path_rate == 0.1 and config.optim.min_lr == 1e-5  # convpass/vtab/train.py


def test_vpt_vitb_cifar_dry_run_builds_vpt_deep_with_the_paper_count(tmp_path, capsys):

    import train as train_tool

    from visionpeft.cli.common import run

    root = write_tiny_cifar100(tmp_path)
    args = [str(ROOT / "configs" / "vpt_vitb_cifar.yaml"), "model.pretrained=false", f"data.root={root}", "--dry-run"]
    assert run(train_tool.main, args) == 0
    out = capsys.readouterr().out
    assert "92,160" in out and "76,900" in out and "data: cifar100, 100 classes" in out


def test_the_tiny_control_config_makes_its_data_in_the_tiny_pipeline_s_colours():
    """The data command in the tiny control config's header is the one the README gives: fill50k in the embedded
    pipeline's eight colours (without ``--palette`` the pairs use all 148 colour names the pipeline never learned)."""
    import shlex

    from visionpeft.demo.captioned_mix import CIRCLE_COLOURS

    lines = (ROOT / "configs/control/controlnet_tiny_sd_fill.yaml").read_text().splitlines()
    header = " ".join(line.lstrip("#").strip() for line in lines if line.startswith("#"))
    commands = header.replace("\\ ", " ").split("python ")
    data = shlex.split(next(c for c in commands if c.startswith("tools/make_fill50k.py")), comments=True)
    palette = data[data.index("--palette") + 1 :]
    assert tuple(palette) == CIRCLE_COLOURS
