"""Adapters for the adapter-arithmetic tests: saved LoRA folders with random factors, and PEFT's combination of the
same folders."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import tiny_vit

import visionpeft as vp

#: A tiny ViT LoRA PEFT holds as it is (whole Linear layers, no task head), in module order = natural name order.
WHOLE_LAYERS = {"target_modules": ["qkv", "fc1", "fc2"], "modules_to_save": []}


def randomize_lora(model, seed: int, std: float = 0.3) -> None:
    """Random LoRA factors (B nonzero, so the update is), drawn from their own generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in vp.trainable_parameters(model):
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def lora_folder(directory: Path, seed: int, r: int = 4, alpha: float = 8.0, factory=tiny_vit, **options):
    """A model of ``factory`` carrying a random LoRA (``options``: lora options and ``modules_to_save``), saved to
    ``directory``; returns the model."""
    heads = options.pop("modules_to_save", None)
    model = vp.attach(factory(), "lora", r=r, alpha=alpha, modules_to_save=heads, **options)
    randomize_lora(model, seed)
    vp.save_adapter(model, directory)
    return model


def peft_combination(folders, weights, combination_type, seed=0, factory=tiny_vit, **options):
    """PEFT's ``add_weighted_adapter`` on the adapters' PEFT files: module path -> (A, B, scaling) of the new
    adapter. PEFT initialises the new adapter's layers (drawing random numbers) before it draws DARE's masks; the
    generator is seeded with ``seed`` right after that, where the masks start (visionpeft's seed rule)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(factory(), str(folders[0]), adapter_name="a0")
    for i, folder in enumerate(folders[1:], 1):
        model.load_adapter(str(folder), adapter_name=f"a{i}")
    inject = model.base_model.inject_adapter

    def inject_then_seed(*args, **kwargs):
        inject(*args, **kwargs)
        torch.manual_seed(seed)

    model.base_model.inject_adapter = inject_then_seed
    names = [f"a{i}" for i in range(len(folders))]
    model.add_weighted_adapter(names, list(weights), "combined", combination_type=combination_type, **options)
    found = {}
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "combined" in module.lora_A:
            a, b = module.lora_A["combined"].weight.detach(), module.lora_B["combined"].weight.detach()
            found[path] = (a, b, module.scaling["combined"])
    return found
