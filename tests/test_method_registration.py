"""A method is registered under the name its class states, and registration refuses declarations that disagree."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from visionpeft.errors import ConfigError
from visionpeft.methods import METHODS, Method, MethodConfig
from visionpeft.methods.base import register_method
from visionpeft.methods.lora import LoRAConfig
from visionpeft.schema import setting


@dataclass
class ProbeConfig(MethodConfig):
    scale: float = setting(1.0, "a scale", min=0)


@pytest.fixture
def registry(monkeypatch):
    """METHODS as it is, restored after the test (a registration that succeeds stays out of other tests)."""
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    return METHODS


def _method(**declared) -> type[Method]:
    return type("Probe", (Method,), {"name": "probe", "config_class": ProbeConfig, **declared})


def test_every_method_answers_to_the_name_it_is_registered_under():
    assert all(METHODS.get(name).name == name for name in METHODS.names())


def test_the_registered_name_is_the_class_s_own(registry):
    cls = register_method(_method())
    assert registry.get("probe") is cls
    with pytest.raises(ValueError, match="method .*Probe states its name as 'other' but is registered as 'another'"):
        registry.register("another")(_method(name="other"))
    with pytest.raises(ValueError, match="has no name"):
        register_method(_method(name=""))


def test_registration_refuses_a_declaration_its_class_contradicts(registry):
    with pytest.raises(ValueError, match="declares merges_exactly=True but does not implement merge"):
        register_method(_method(merges_exactly=True))
    with pytest.raises(ValueError, match="declares merges_exactly=False but implements merge"):
        register_method(_method(merge=lambda self: None))
    with pytest.raises(ValueError, match="share the config class LoRAConfig"):
        register_method(_method(config_class=LoRAConfig))
    with pytest.raises(ValueError, match="needs a MethodConfig subclass of its own"):
        register_method(_method(config_class=MethodConfig))
    with pytest.raises(ValueError, match="'controlnet' and 'probe' both read ControlNetModel folders"):
        register_method(
            _method(
                diffusers_folder_class="ControlNetModel",
                options_from_folder=classmethod(lambda cls, config: {}),
                load_folder_model=lambda self, model: None,
            )
        )
    with pytest.raises(ValueError, match="reads T2IAdapter2 folders: implement"):
        register_method(_method(diffusers_folder_class="T2IAdapter2"))
    assert "probe" not in registry


def test_a_config_is_checked_when_it_is_built(registry):
    register_method(_method())
    with pytest.raises(ConfigError, match="method 'probe' option 'scale' must be at least 0, got -1"):
        ProbeConfig(scale=-1)
