"""Methods say what they can do and need; the code around them asks instead of naming them. Task models declare
their library model and heads through one protocol."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_clip, tiny_unet, tiny_vit
from torch import nn

import visionpeft as vp
from visionpeft.errors import ConfigError
from visionpeft.methods import METHODS, fill_task_inputs
from visionpeft.methods.folders import folder_classes
from visionpeft.tasks import TaskModel

PACKAGE = Path(__file__).resolve().parents[1] / "visionpeft"


def test_can_merge_asks_every_method():
    assert vp.can_merge(vp.attach(tiny_vit(), [("lora", {}), ("difffit", {})]))
    assert not vp.can_merge(vp.attach(tiny_vit(), [("lora", {}), ("vpt", {})]))
    assert not vp.can_merge(tiny_vit())  # nothing attached


def test_can_export_asks_every_method_for_its_part():
    assert vp.can_export(vp.attach(tiny_vit(), "lora"), "peft")
    assert not vp.can_export(vp.attach(tiny_vit(), "lora"), "diffusers")  # no Stable Diffusion module paths
    assert vp.can_export(vp.attach(tiny_vit(), "linear"), "peft")
    assert not vp.can_export(vp.attach(tiny_vit(), "linear"), "diffusers")
    assert not vp.can_export(vp.attach(tiny_vit(), [("vpt", {}), ("lora", {})]), "peft")
    assert not vp.can_export(vp.attach(tiny_clip(), "lora"), "peft")  # LoRA on nn.MultiheadAttention refuses
    assert vp.can_export(vp.attach(tiny_unet(), "lora"), "diffusers")
    assert vp.can_export(vp.attach(tiny_vit(), "vpt"), "visionpeft")


def test_fill_task_inputs_fills_only_what_the_user_left_out():
    specs = [("coop", {"n_ctx": 4}), ("lora", {"r": 2}), ("cocoop", {"classnames": ["given"]})]
    filled = fill_task_inputs(specs, {"classnames": ["cat", "dog"]}, "classification")
    assert filled == [("coop", {"n_ctx": 4, "classnames": ["cat", "dog"]}), ("lora", {"r": 2}), specs[2]]
    assert specs[0] == ("coop", {"n_ctx": 4})  # the input is not changed
    assert fill_task_inputs([("textual_inversion", {})], {"token": "<x>"}, "personalization") == [
        ("textual_inversion", {"token": "<x>"})
    ]
    with pytest.raises(ConfigError) as err:
        fill_task_inputs([("coop", {})], {"token": "<x>"}, "personalization")
    assert str(err.value) == "method 'coop' needs classnames, which the personalization task does not provide"
    with pytest.raises(ConfigError, match="unknown method 'lorra'"):
        fill_task_inputs([("lorra", {})], {}, "classification")


def test_declarations_of_the_methods():
    formats = {n: METHODS.get(n).export_formats for n in METHODS.names()}
    assert formats["lora"] == {"peft", "diffusers", "kohya"} and formats["textual_inversion"] == {"diffusers", "kohya"}
    assert formats["linear"] == {"peft"} and not formats["vpt"]
    assert formats["controlnet"] == formats["t2i_adapter"] == formats["ip_adapter"] == {"diffusers"}
    assert METHODS.get("coop").task_inputs == ("classnames",) == METHODS.get("cocoop").task_inputs
    assert METHODS.get("textual_inversion").task_inputs == ("token",)
    reading = {n: METHODS.get(n).call_inputs for n in METHODS.names() if METHODS.get(n).call_inputs}
    controls = {name: ("control_image",) for name in ("controlnet", "controlnet_lora", "t2i_adapter")}
    assert reading == {**controls, "ip_adapter": ("ip_image_embeds",)}
    assert METHODS.get("ip_adapter").task_inputs == ("image_embed_dim",)
    assert folder_classes() == {
        "ControlNetModel": "controlnet",
        "FluxControlNetModel": "controlnet",
        "SD3ControlNetModel": "controlnet",
        "T2IAdapter": "t2i_adapter",
    }


def _code_strings(path: Path) -> set[str]:
    """String constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None:
            docstrings.add(id(node.body[0].value))
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)} - {
        n.value for n in ast.walk(tree) if id(n) in docstrings
    }


OUTSIDE_THE_METHODS = [
    "checkpoint/exporters.py",
    "checkpoint/folder.py",
    "adapter.py",
    "tasks/clip_classifier.py",
    *sorted(str(path.relative_to(PACKAGE)) for path in (PACKAGE / "cli").glob("*.py")),
]


#: strings equal to a method name that are not one there: a word the method took its name from, or the command of a
#: method's own search tool
NOT_A_METHOD = {
    "cli/adapters.py": {"adapter", "linear"},  # an adapter folder argument; PEFT's combination type "linear"
    "cli/noah.py": {"adapter"},  # the search's `--adapter` (which checkpoint of the run to score)
    "cli/generate.py": {"adapter"},  # a run folder's `adapter/` subfolder, read by `--adapter RUN`
    "cli/eval_zeroshot.py": {"tip_adapter"},  # `--tip-adapter`: the training-free method a training run refuses
    "cli/__init__.py": {"noah"},  # the `visionpeft noah` command: NOAH's search is a command of its own
}


@pytest.mark.parametrize("module", OUTSIDE_THE_METHODS)
def test_no_method_names_outside_the_methods(module):
    """The exporters, the adapter API, the CLIP task model and every command ask the methods' declarations."""
    assert not _code_strings(PACKAGE / module) & set(METHODS.names()) - NOT_A_METHOD.get(module, set())


class Segmenter(nn.Module):
    """A task model: a backbone and a decode head, declared through the TaskModel protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = tiny_vit(num_classes=0)
        torch.manual_seed(3)
        self.decode_head = nn.Conv2d(32, 5, 1)

    def inner_model(self) -> nn.Module:
        return self.backbone

    def task_heads(self) -> dict[str, nn.Module]:
        return {"decode_head": self.decode_head}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (features,) = vp.features(self, x, [-1])
        return self.decode_head(features)


def test_a_task_model_with_its_own_head(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    model = Segmenter()
    assert isinstance(model, TaskModel)
    vp.attach(model, [("lora", {"r": 2}), ("bitfit", {})])
    counts = vp.count_parameters(model)["by_group"]
    assert counts["decode_head"] == 32 * 5 + 5 and counts["lora"] == 2 * 2 * (32 * 2 + 2 * 32)
    names = dict(vp.checkpoint.folder.adapter_state_dict(model))
    assert {"decode_head.weight", "decode_head.bias", "blocks.0.attn.q.lora_A"} <= set(names)
    assert "base.backbone.blocks.0.mlp.fc1.bias" in names and not any(n.startswith("base.decode") for n in names)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        out = model(x)
    assert out.shape == (2, 5, 4, 4)
    vp.save_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(vp.load_adapter(Segmenter(), tmp_path)(x), out, rtol=0, atol=0)
    with torch.no_grad():
        reference = Segmenter()(x)
        torch.testing.assert_close(vp.detach(model)(x), reference, rtol=0, atol=0)
