"""The config system: dataclass defaults <- YAML with ``_base_`` <- ``key=value``; every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from visionpeft.config import load_config, methods_of_config, save_config
from visionpeft.errors import ConfigError


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tree(tmp_path):
    """configs/_base_/{model,schedule}.yaml and an experiment that inherits both."""
    _write(tmp_path / "_base_" / "model.yaml", "model: {name: vit_small_patch16_224, drop_path_rate: 0.1}\n")
    _write(
        tmp_path / "_base_" / "schedule.yaml",
        "_base_: model.yaml\noptim: {name: sgd, lr: 0.5, epochs: 50, warmup_epochs: 5}\n"
        "method: {name: vpt, num_tokens: 50, deep: true}\n",
    )
    return _write(
        tmp_path / "exp" / "run.yaml",
        "_base_: [../_base_/schedule.yaml]\noptim: {lr: 0.25}\ndata: {batch_size: 32}\n",
    )


def test_defaults_then_bases_then_file_then_overrides(tree):
    config = load_config(tree, ["optim.epochs=20", "model.drop_path_rate=0.2"])
    assert config.model.name == "vit_small_patch16_224"  # from the base of the base
    assert config.model.drop_path_rate == 0.2  # override beats base
    assert config.optim.lr == 0.25 and config.optim.warmup_epochs == 5  # file beats base, base beats default
    assert config.optim.epochs == 20
    assert config.data.batch_size == 32 and config.data.eval_batch_size == 128  # dataclass default kept
    assert config.train.run_name == "run"  # the file's stem
    assert methods_of_config(config) == [("vpt", {"num_tokens": 50, "deep": True})]


def test_config_is_frozen(tree):
    config = load_config(tree)
    with pytest.raises(ReadonlyConfigError):
        config.optim.lr = 1.0


def test_method_is_replaced_whole_never_merged(tree):
    """A base's VPT options must not leak into the LoRA an override asks for."""
    config = load_config(tree, ["method={name: lora, r: 4}"])
    assert methods_of_config(config) == [("lora", {"r": 4})]
    assert methods_of_config(load_config(tree, ["method=bitfit"])) == [("bitfit", {})]
    # A dotted override of one option keeps the rest of the method.
    assert methods_of_config(load_config(tree, ["method.num_tokens=5"])) == [("vpt", {"num_tokens": 5, "deep": True})]
    # A file replaces its base's method the same way.
    child = _write(tree.parent / "child.yaml", "_base_: run.yaml\nmethod: {name: adaptformer}\n")
    assert methods_of_config(load_config(child)) == [("adaptformer", {})]


def test_hybrid_method_list(tree):
    config = load_config(tree, ["method=[{name: vpt, num_tokens: 5}, {name: lora, r: 8}]"])
    assert methods_of_config(config) == [("vpt", {"num_tokens": 5}), ("lora", {"r": 8})]


def test_saved_resolved_config_reloads_identically(tree, tmp_path):
    config = load_config(tree, ["optim.epochs=20", "method={name: lora, r: 4, targets: [q, v]}"])
    save_config(config, tmp_path / "out" / "config.yaml")
    again = OmegaConf.to_container(load_config(tmp_path / "out" / "config.yaml"))
    expected = OmegaConf.to_container(config)
    expected["train"]["output_dir"] = str(Path(expected["train"]["output_dir"]).resolve())  # paths made absolute
    assert again == expected  # run_name "run" kept, not "config"
    assert "_base_" not in (tmp_path / "out" / "config.yaml").read_text()


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("optim: {lrr: 0.1}\n", [], "unknown config key 'optim.lrr' in {path} (did you mean 'optim.lr'?)"),
        ("dataa: {root: x}\n", [], "unknown config key 'dataa' in {path} (did you mean 'data'?)"),
        ("", ["train.sed=1"], "unknown config key 'train.sed' in override 'train.sed=1' (did you mean 'train.seed'?)"),
        ("optim: {epochs: ten}\n", [], "config key 'optim.epochs' in {path} has the wrong type"),
        ("", ["data.download=maybe"], "config key 'data.download' in override 'data.download=maybe' has the wrong"),
        ("", ["optim.lr"], "override 'optim.lr' must look like key=value"),
        ("method: {name: lora, rank: 8}\n", [], "unknown option 'rank' for method 'lora'"),
        ("method: {name: lora, r: eight}\n", [], "'r'"),
        ("method: [vpt, {r: 3}]\n", [], "config key 'method' must be a method name"),
        ("", ["train.mixed_precision=fp8"], "config key 'train.mixed_precision' must be one of no, fp16, bf16"),
        ("", ["data.batch_size=0"], "config key 'data.batch_size' must be at least 1, got 0"),
        ("", ["optim.grad_accum=0"], "config key 'optim.grad_accum' must be at least 1"),
        ("", ["optim.label_smoothing=1.0"], "config key 'optim.label_smoothing' must be below 1"),
        ("", ["optim.epochs=5"], "optim.warmup_epochs (10) exceeds optim.epochs (5)"),
        ("[1, 2]\n", [], "must hold a mapping at the top level"),
        ("optim: {lr: [\n", [], "is not valid YAML"),
        ("_base_: missing.yaml\n", [], "missing.yaml does not exist"),
    ],
)
def test_mistakes_are_config_errors_naming_the_key(tmp_path, text, overrides, message):
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    text = str(info.value)
    assert message.format(path=path) in text, text
    assert "\n" not in text


def test_base_cycle_is_an_error(tmp_path):
    _write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    _write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself through _base_"):
        load_config(tmp_path / "a.yaml")


def test_mixed_precision_no_survives_yaml_booleans(tmp_path):
    path = _write(tmp_path / "run.yaml", "train: {mixed_precision: no}\n")  # YAML 1.1: `no` is false
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(path, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"


def test_method_name_on_the_command_line_switches_to_that_methods_defaults(tree):
    config = load_config(tree, ["method=lora", "method.r=4"])
    assert OmegaConf.to_container(config.method) == {"name": "lora", "r": 4}  # nothing of vpt's options left
    assert OmegaConf.to_container(load_config(tree, ["method=lora"]).method) == {"name": "lora"}


def test_switching_only_method_name_names_the_options_of_the_old_method(tree):
    with pytest.raises(ConfigError, match="from vpt to lora, but the options deep, num_tokens were written for vpt"):
        load_config(tree, ["method.name=lora"])
    assert load_config(tree, ["method.name=vpt", "method.num_tokens=5"]).method.num_tokens == 5


def test_the_task_fields_help_names_every_registered_task():
    from visionpeft.config.sections import TASK_HELP
    from visionpeft.registry import TRAINERS

    assert set(TASK_HELP.split(": ", 1)[1].split(", ")) == set(TRAINERS.names())
