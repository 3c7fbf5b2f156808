"""Extension points a method can use: the conditioning channel for per-call inputs, hooks with keyword arguments,
side towers that counting, saving, merging and detaching treat like any other module. A test-only method exercises
them (registered for the test, removed after)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from tiny_models import _run_vit, tiny_unet, tiny_vit
from torch import nn

import visionpeft as vp
from visionpeft.adapter import backbone_of
from visionpeft.errors import ConfigError, IncompatibleMethodError
from visionpeft.methods import METHODS, Method, MethodConfig, check_call_inputs

CONTROL = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(5))  # tiny ViT block output: 1 + 16 tokens


class Side(nn.Module):
    """A side network with a persistent buffer counting its training calls."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        return self.linear(x)


@dataclass
class ControlConfig(MethodConfig):
    """Adds ``scale * control`` (through a side tower when ``side_width`` > 0) at ``stage`` (default: block 0).

    ``mode``: ``output`` (a forward hook), ``kwargs_input`` / ``kwargs_output`` (hooks with keyword arguments, on
    the ``hidden_states`` a diffusers block takes by keyword).
    """

    scale: float = 1.0
    stage: str = ""
    mode: str = "output"
    side_width: int = 0


class Control(Method):
    name = "test_control"
    config_class = ControlConfig
    call_inputs = ("control_image",)

    def build(self) -> None:
        cfg = self.config
        module = self.tower.stages[cfg.stage] if cfg.stage else self.blocks()[0].module
        self.side = self.add_tower("control_net", Side(cfg.side_width)) if cfg.side_width else None
        self.seen_kwargs: list[str] = []
        if cfg.mode == "output":
            self.hook_output(module, self._add)
        elif cfg.mode == "kwargs_input":
            self.hook_input(module, self._add_to_kwargs, with_kwargs=True)
        else:
            self.hook_output(module, self._add_with_kwargs, with_kwargs=True)

    def _control(self) -> torch.Tensor:
        control = self.call_input("control_image")
        return self.config.scale * (self.side(control) if self.side is not None else control)

    def _add(self, module, args, output):
        return output + self._control()

    def _add_to_kwargs(self, module, args, kwargs):
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + self._control()}

    def _add_with_kwargs(self, module, args, kwargs, output):
        self.seen_kwargs = sorted(kwargs)
        return (output[0] + self._control(), *output[1:])


@pytest.fixture
def control_method():
    METHODS.register("test_control")(Control)
    try:
        yield Control
    finally:
        METHODS._items.pop("test_control")


def _reference_vit(scale: float) -> torch.Tensor:
    model = tiny_vit()
    model.blocks[0].register_forward_hook(lambda m, a, o: o + scale * CONTROL)
    with torch.no_grad():
        return _run_vit(model)


def test_conditioning_hands_per_call_inputs_to_the_method(control_method):
    model = vp.attach(tiny_vit(), "test_control", scale=0.5)
    with torch.no_grad():
        with vp.conditioning(model, control_image=CONTROL):
            out = _run_vit(model)
        torch.testing.assert_close(out, _reference_vit(0.5), rtol=0, atol=0)
        with pytest.raises(ConfigError, match="test_control needs a per-call control_image"):
            _run_vit(model)  # cleared after the block
        with pytest.raises(ConfigError, match="no attached method reads a per-call depth_map"):
            with vp.conditioning(model, depth_map=CONTROL):
                pass
        holder = nn.ModuleDict({"net": model})  # any module holding adapted models
        with vp.conditioning(holder, control_image=CONTROL):
            torch.testing.assert_close(holder["net"](torch.randn(2, 3, 32, 32, generator=_gen())), out)
            clone = copy.deepcopy(model)  # a copy starts without the per-call inputs of this call
            with pytest.raises(ConfigError, match="needs a per-call control_image"):
                _run_vit(clone)
        with vp.conditioning(clone, control_image=2 * CONTROL):
            torch.testing.assert_close(_run_vit(clone), _reference_vit(1.0), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="no visionpeft method is attached"):
        with vp.conditioning(tiny_vit(), control_image=CONTROL):
            pass


def _gen():
    return torch.Generator().manual_seed(1)


def test_check_call_inputs_names_the_missing_input(control_method):
    specs = [("lora", {}), ("test_control", {})]
    check_call_inputs(specs, {"control_image"}, "control")
    with pytest.raises(ConfigError) as err:
        check_call_inputs(specs, set(), "classification")
    assert str(err.value) == (
        "method 'test_control' needs a per-call control_image, which the classification task does not provide"
    )


@pytest.mark.parametrize("mode", ["kwargs_input", "kwargs_output"])
def test_hooks_with_keyword_arguments(control_method, mode):
    control = torch.randn(2, 16, 8, 8, generator=_gen()) if mode == "kwargs_input" else torch.randn(2, 16, 4, 4)
    g = torch.Generator().manual_seed(3)
    x, t, text = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 16, generator=g)
    reference = tiny_unet()
    with torch.no_grad():
        plain = reference(x, t, text).sample
    if mode == "kwargs_input":  # down.0 receives hidden_states by keyword: only a kwargs pre-hook sees it
        reference.down_blocks[0].register_forward_pre_hook(
            lambda m, a, kw: (a, {**kw, "hidden_states": kw["hidden_states"] + control}), with_kwargs=True
        )
    else:
        reference.down_blocks[0].register_forward_hook(lambda m, a, kw, o: (o[0] + control, *o[1:]), with_kwargs=True)
    model = vp.attach(tiny_unet(), "test_control", stage="down.0", mode=mode)
    with torch.no_grad():
        expected = reference(x, t, text).sample
        with vp.conditioning(model, control_image=control):
            torch.testing.assert_close(model(x, t, text).sample, expected, rtol=0, atol=0)
            clone = copy.deepcopy(model)
        with vp.conditioning(clone, control_image=control):
            torch.testing.assert_close(clone(x, t, text).sample, expected, rtol=0, atol=0)
        if mode == "kwargs_output":
            assert {"hidden_states", "temb"} <= set(vp.adapter.methods_of(model)[0].seen_kwargs)
        vp.detach(model)
        torch.testing.assert_close(model(x, t, text).sample, plain, rtol=0, atol=0)


def test_a_side_tower_is_counted_saved_detached_and_not_merged(control_method, tmp_path):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = _run_vit(model)
    vp.attach(model, [("test_control", {"side_width": 32, "scale": 0.1}), ("lora", {"r": 2})])
    assert isinstance(model.control_net, Side) and "control_net.linear.weight" in model.state_dict()
    counts = vp.count_parameters(model)
    assert counts["by_group"] == {"test_control": 32 * 32 + 32, "lora": 2 * 2 * (32 * 2 + 2 * 32), "head": 330}
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert {n for n, _ in vp.trainable_parameters(model)} >= {"control_net.linear.weight", "control_net.linear.bias"}
    vp.set_train_mode(model, True)
    with vp.conditioning(model, control_image=CONTROL):
        _run_vit(model).square().mean().backward()
        _run_vit(model)
    assert model.control_net.linear.weight.grad is not None and int(model.control_net.calls) == 2
    model.eval()
    state = vp.checkpoint.folder.adapter_state_dict(model)
    assert {"control_net.linear.weight", "control_net.calls"} <= set(state)
    assert [n for n, _ in vp.trainable_buffers(model)] == ["control_net.calls"]
    _perturb(model)
    with torch.no_grad(), vp.conditioning(model, control_image=CONTROL):
        trained = _run_vit(model)
    vp.save_adapter(model, tmp_path)
    fresh = vp.load_adapter(tiny_vit(), tmp_path)
    assert int(fresh.control_net.calls) == 2
    with torch.no_grad(), vp.conditioning(fresh, control_image=CONTROL):
        torch.testing.assert_close(_run_vit(fresh), trained, rtol=0, atol=0)
    assert not vp.can_merge(model)
    with pytest.raises(IncompatibleMethodError, match="test_control cannot be merged"):
        vp.merge(model)
    vp.detach(model)
    assert not hasattr(model, "control_net")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(_run_vit(model), plain, rtol=0, atol=0)


def _perturb(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_a_distilled_deit_takes_token_methods_and_trains_both_heads():
    import timm

    model = timm.create_model(
        "deit_tiny_distilled_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=5,
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    reference = model(x)
    for method in ("adaptformer", "convpass", "lora"):
        vp.attach(model, method)
        torch.testing.assert_close(model(x), reference)  # zero-initialised branches: unchanged at initialisation
        assert set(vp.count_parameters(model)["by_group"]) == {method, "head", "head_dist"}
        vp.detach(model)
    vp.attach(model, "vpt", num_tokens=3)
    assert backbone_of(model).tower(None).tokens.num_prefix == 2  # prompts go after the class + distillation tokens
    assert model(x).shape == (2, 5)
