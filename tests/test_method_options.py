"""Method options are checked against the ranges their config dataclasses declare, before any model is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import train as train_tool  # noqa: E402
from _classify_utils import tiny_config, write_pretrained_vit, write_tiny_cifar10

import visionpeft as vp
from visionpeft.cli.common import run  # noqa: E402
from visionpeft.errors import ConfigError
from visionpeft.methods import METHODS, make_config
from visionpeft.methods.lora import LoRAConfig
from visionpeft.methods.vpt import VPTConfig
from visionpeft.schema import check_fields, setting

BAD_OPTIONS = [
    ("convpass", {"dim": -1}, "method 'convpass' option 'dim' must be at least 1, got -1"),
    ("convpass", {"scale": 0}, "method 'convpass' option 'scale' must be above 0, got 0.0"),
    ("convpass", {"dropout": 1.0}, "method 'convpass' option 'dropout' must be below 1, got 1.0"),
    ("adaptformer", {"bottleneck": 0}, "method 'adaptformer' option 'bottleneck' must be at least 1, got 0"),
    ("adaptformer", {"dropout": -0.1}, "method 'adaptformer' option 'dropout' must be at least 0, got -0.1"),
    ("vpt", {"num_tokens": 0}, "method 'vpt' option 'num_tokens' must be at least 1, got 0"),
    ("vpt", {"dropout": float("nan")}, "method 'vpt' option 'dropout' must be a number, got nan"),
    ("lora", {"r": 0}, "method 'lora' option 'r' must be at least 1, got 0"),
    ("lora", {"alpha": -8}, "method 'lora' option 'alpha' must be above 0, got -8.0"),
    ("lora", {"targets": []}, "method 'lora' option 'targets' must not be empty, got ()"),
    ("coop", {"n_ctx": 0}, "method 'coop' option 'n_ctx' must be at least 1, got 0"),
    ("cocoop", {"n_ctx": 0}, "method 'cocoop' option 'n_ctx' must be at least 1, got 0"),
    ("coop", {"class_token_position": "mid"}, "method 'coop' option 'class_token_position' must be one of end"),
    ("coop", {"init_std": -1.0}, "method 'coop' option 'init_std' must be at least 0, got -1.0"),
    ("ssf", {"init_std": -0.02}, "method 'ssf' option 'init_std' must be at least 0, got -0.02"),
    ("textual_inversion", {"num_vectors": 0}, "method 'textual_inversion' option 'num_vectors' must be at least 1"),
    ("textual_inversion", {"token": ""}, "method 'textual_inversion' option 'token' must not be empty, got ''"),
]


@pytest.mark.parametrize(("name", "options", "message"), BAD_OPTIONS)
def test_make_config_checks_declared_ranges(name, options, message):
    with pytest.raises(ConfigError) as info:
        make_config(name, options)
    assert str(info.value).startswith(message)


def test_every_method_option_is_declared_with_help_and_the_defaults_pass():
    for name in METHODS.names():
        cls = METHODS.get(name).config_class
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no setting(...) help"
        make_config(name)  # the defaults satisfy their own ranges


def test_a_built_config_is_checked_too_and_the_model_is_left_alone(vit):
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    with pytest.raises(ConfigError, match="method 'vpt' option 'num_tokens' must be at least 1, got 0"):
        vp.attach(vit, VPTConfig(num_tokens=0))
    with pytest.raises(ConfigError, match="method 'lora' option 'targets' must not be empty"):
        vp.attach(vit, [("lora", LoRAConfig(targets=()))])
    with pytest.raises(ConfigError, match="method 'adaptformer' option 'bottleneck' must be at least 1, got 0"):
        vp.attach(vit, "adaptformer", bottleneck=0)
    assert getattr(vit, "_visionpeft_state", None) is None  # refused before anything was attached
    assert all((vit.state_dict()[k] == v).all() for k, v in before.items())


def test_options_that_are_not_a_mapping_are_refused():
    with pytest.raises(ConfigError, match="the options of method 'vpt' must be a mapping"):
        make_config("vpt", "num_tokens=3")


def test_check_fields_reads_dicts_and_instances_with_exclusive_bounds():
    @dataclass
    class Schema:
        rate: float = setting(0.5, "a rate", above=0, below=1)
        names: tuple[str, ...] = setting(("a",), "names", nonempty=True)

    check_fields(Schema, {"rate": 0.5, "names": ["x"]})
    with pytest.raises(ConfigError, match="config key 'rate' must be above 0, got 0"):
        check_fields(Schema, {"rate": 0, "names": ["x"]})
    with pytest.raises(ConfigError, match="thing 'names' must not be empty"):
        check_fields(Schema, Schema(names=()), subject="thing")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    return tiny_config(tmp, write_pretrained_vit(tmp / "vit.safetensors"), write_tiny_cifar10(tmp / "data"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method={name: convpass, dim: -1}"], "method 'convpass' option 'dim' must be at least 1, got -1"),
        (["method={name: adaptformer, bottleneck: 0}"], "'adaptformer' option 'bottleneck' must be at least 1, got 0"),
        (["method.num_tokens=0"], "method 'vpt' option 'num_tokens' must be at least 1, got 0"),
        (["train.seed=-1"], "config key 'train.seed' must be at least 0, got -1"),
        (["train.seed=4294967296"], "config key 'train.seed' must be at most 4294967295, got 4294967296"),
        (["optim.momentum=1.5"], "config key 'optim.momentum' must be at most 1, got 1.5"),
        (["optim.lr_scale_batch=0"], "config key 'optim.lr_scale_batch' must be at least 1, got 0"),
    ],
)
def test_bad_method_option_or_value_is_one_line_before_any_model(config, overrides, message, capsys, monkeypatch):
    built = []
    monkeypatch.setattr("visionpeft.trainers.classification.create_classifier", lambda *a: built.append(a))
    assert run(train_tool.main, [str(config), *overrides, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and err[0].endswith(message), err
    assert built == []


@pytest.fixture
def method_checks(monkeypatch):
    """The config classes of every method config checked (built) from now on, in order."""
    from visionpeft.methods import base

    checked, check = [], base.check_fields

    def counting(schema, node, *args, **kwargs):
        checked.append(schema.__name__)
        return check(schema, node, *args, **kwargs)

    monkeypatch.setattr(base, "check_fields", counting)
    return checked


def test_a_run_checks_its_method_options_once_and_attaches_the_configs_it_built(config, method_checks, tmp_path):
    hybrid = "method=[{name: vpt, num_tokens: 2}, {name: lora, r: 2}]"
    assert run(train_tool.main, [str(config), hybrid, "--dry-run"]) == 0
    assert method_checks == ["VPTConfig", "LoRAConfig"]
    method_checks.clear()
    overrides = [hybrid, "optim.epochs=1", "optim.warmup_epochs=0", f"train.output_dir={tmp_path}"]
    assert run(train_tool.main, [str(config), *overrides]) == 0
    assert method_checks == ["VPTConfig", "LoRAConfig"]
