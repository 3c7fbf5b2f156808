"""Optimisers and rates (issue 30): LoRA+ equal to PEFT's ``create_loraplus_optimizer`` groups, Prodigy where
``prodigyopt`` is installed and one line where it is not."""

from __future__ import annotations

import re

import peft
import pytest
import torch
from omegaconf import OmegaConf
from peft.optimizers import create_loraplus_optimizer
from tiny_models import tiny_vit

import visionpeft as vp
from visionpeft.config.sections import OptimConfig
from visionpeft.errors import ConfigError
from visionpeft.trainers.run import build_optimizer


def optim_section(**options):
    return OmegaConf.merge(OmegaConf.structured(OptimConfig), options)


def rates(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, float]:
    return {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}


def ours_key(name: str) -> str:
    """``blocks.0.attn.proj.updates.main.lora_B`` -> ``blocks.0.attn.proj.lora_B`` (the key both sides share)."""
    return name.replace(".updates.main", "")


def peft_key(name: str) -> str:
    """``base_model.model.blocks.0.attn.proj.lora_B.default.weight`` -> ``blocks.0.attn.proj.lora_B``."""
    name = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
    name = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1", name)
    return name.replace(".lora_magnitude_vector.default.weight", ".magnitude")


def test_loraplus_rates_equal_peft_groups():
    """B matrices, DoRA magnitudes and the head's bias at lr x ratio, A matrices and the head's weight at lr: the
    learning rate of every tensor equals PEFT's LoRA+ optimizer on the same model."""
    targets = ["attn.proj", "mlp.fc1"]
    ours = vp.attach(tiny_vit(), "lora", r=4, target_modules=targets, use_dora=True)
    config = peft.LoraConfig(r=4, target_modules=targets, use_dora=True, modules_to_save=["head"])
    theirs = peft.get_peft_model(tiny_vit(), config)
    built = build_optimizer(optim_section(lr=1e-3, loraplus_lr_ratio=16.0), ours, 1)
    reference = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    ours_rates = rates(built, {id(p): ours_key(n) for n, p in vp.trainable_parameters(ours)})
    peft_names = {id(p): peft_key(n) for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_rates == rates(reference, peft_names)
    assert sorted(set(ours_rates.values())) == [1e-3, 1.6e-2]


def test_loraplus_multiplies_the_other_multipliers_and_off_keeps_one_rate():
    model = vp.attach(tiny_vit(), "lora", r=2, targets=["q", "v"])
    names = {id(p): n for n, p in vp.trainable_parameters(model)}
    plain = rates(build_optimizer(optim_section(lr=1e-3), model, 1), names)
    assert set(plain.values()) == {1e-3}
    plus = rates(build_optimizer(optim_section(lr=1e-3, loraplus_lr_ratio=4.0), model, 1, {"head.": 10.0}), names)
    assert plus["blocks.0.attn.qkv.updates.q.lora_A"] == 1e-3
    assert plus["blocks.0.attn.qkv.updates.q.lora_B"] == 4e-3
    assert plus["head.weight"] == pytest.approx(1e-2) and plus["head.bias"] == pytest.approx(4e-2)


def test_prodigy_missing_is_one_line(monkeypatch):
    import importlib.util

    from visionpeft.config import load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^optim.name=prodigy needs the prodigyopt package: pip install prodigyopt$"):
        load_config(None, ["optim.name=prodigy", "optim.lr=1.0"])


def test_prodigy_trains_where_installed():
    prodigyopt = pytest.importorskip("prodigyopt")
    model = vp.attach(tiny_vit(), "lora", r=2, targets=["q", "v"])
    optimizer = build_optimizer(optim_section(name="prodigy", lr=1.0, weight_decay=0.01), model, 1)
    assert isinstance(optimizer, prodigyopt.Prodigy)
    assert all(g["decouple"] and g["use_bias_correction"] and g["safeguard_warmup"] for g in optimizer.param_groups)
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32, generator=generator), torch.arange(8) % 10
    vp.set_train_mode(model, True)
    losses = []
    for _ in range(60):  # Prodigy starts from a step size of 1e-6 and grows it
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert optimizer.param_groups[0]["d"] > 1e-4 and losses[-1] < losses[0] - 0.03


def lora_sizes(model) -> dict[str, tuple[int, float]]:
    """Module path -> (rank, scale) of every LoRA update of a visionpeft model."""
    from visionpeft.methods.base import base_module_paths

    lora = next(m for m in vp.adapter.require_state(model).methods if m.name == "lora")
    paths = base_module_paths(model)
    sizes = {}
    for wrapper in lora.wrappers():
        for update in wrapper.updates.values() if hasattr(wrapper, "updates") else [wrapper.update]:
            sizes[paths[id(wrapper.base)]] = (update.lora_A.shape[0], update.scale)
    return sizes


def test_rank_and_alpha_patterns_follow_peft_and_load_back_through_peft(tmp_path):
    """PEFT's rule: the first key that matches ``(.*\\.)?(KEY)$`` sets a module's rank / alpha; a module matched
    by rank_pattern only keeps alpha (its scale changes). The PEFT export loads with PeftModel.from_pretrained and
    gives the same outputs."""
    from tiny_models import _run_vit, perturb

    targets = ["attn.qkv", "attn.proj", "mlp.fc1"]
    ranks, alphas = {"blocks.1.attn.proj": 6, "fc1": 3}, {"fc1": 12.0}
    ours = vp.attach(tiny_vit(), "lora", r=4, alpha=8, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas)
    theirs = peft.get_peft_model(tiny_vit(), config)
    expected = {
        name.removeprefix("base_model.model."): (module.r["default"], module.scaling["default"])
        for name, module in theirs.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    assert lora_sizes(ours) == expected
    assert expected["blocks.1.attn.proj"] == (6, 8 / 6) and expected["blocks.0.mlp.fc1"] == (3, 4.0)
    perturb(ours)
    vp.save_adapter(ours, tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_vit(), tmp_path).eval()
    torch.testing.assert_close(_run_vit(loaded), _run_vit(ours), rtol=1e-5, atol=1e-5)


def test_rank_pattern_on_a_fused_projection_and_saved_adapters_keep_it(tmp_path):
    from tiny_models import _run_vit, perturb

    ours = perturb(vp.attach(tiny_vit(), "lora", r=2, targets=["q", "v"], rank_pattern={r"blocks\.0\.attn\.qkv": 5}))
    assert lora_sizes(ours) == {"blocks.0.attn.qkv": (5, 8 / 5), "blocks.1.attn.qkv": (2, 4.0)}
    vp.save_adapter(ours, tmp_path / "vp")
    loaded = vp.load_adapter(tiny_vit(), tmp_path / "vp")
    torch.testing.assert_close(_run_vit(loaded), _run_vit(ours), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank_pattern": {"fc1": 0}}, "option 'rank_pattern' value of 'fc1' must be a positive int, got 0"),
        ({"rank_pattern": {"fc1": 2.5}}, "option 'rank_pattern' value of 'fc1' must be a positive int, got 2.5"),
        ({"alpha_pattern": {"fc(": 2}}, "option 'alpha_pattern' key 'fc(' is not a regex"),
        ({"rank_pattern": ["fc1"]}, "option 'rank_pattern' must map module-path patterns to values"),
    ],
)
def test_bad_patterns_are_one_line(options, message):
    from visionpeft.methods import make_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config("lora", options)
