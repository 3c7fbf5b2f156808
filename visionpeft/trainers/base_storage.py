"""A low-bit frozen base under the adapters (``train.base_storage``): the frozen layers' weights stored in 8 bits.

- ``fp8``: the weight of each frozen ``nn.Linear`` / ``nn.Conv2d`` is stored in ``torch.float8_e4m3fn`` and upcast
  to the running precision whenever the layer reads it (a ``torch.nn.utils.parametrize`` parametrization: the layer's
  own forward, PEFT's or visionpeft's wrappers and DoRA's norm all see the upcast weight, and backward keeps that
  copy until it has used it), as diffusers' layer-wise casting stores weights (``enable_layerwise_casting``) but
  without casting the module back and forth, which breaks a convolution's backward.
- ``int8``: torchao's int8 weight-only quantization (``torchao.quantization.Int8WeightOnlyConfig``, one scale per
  output row) of each frozen ``nn.Linear``; its matmul takes the int8 weights (``pip install torchao``).

Only layers that train nothing are stored so (a LoRA layer's ``base``: ``out = base(x) + update``, the layout PEFT's
LoRA keeps on a quantized layer, its ``base_layer``; any plain frozen layer). With ``int8`` a layer whose weight a
wrapper reads outside its forward (DoRA's norm, the weight-space methods) keeps its precision; biases, norms and
embeddings keep theirs in both. Trained tensors stay fp32. The stored weights are the frozen weights rounded: a
run's adapter learns on them, and is saved against the full-precision base as usual; a merged export (DiffFit, BitFit,
full: ``RUN/merged/``) is merged into that base read again, never into the stored copy
(:func:`~.personalization.save_outputs`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

logger = logging.getLogger("visionpeft")

#: The layer types each storage changes.
STORED_LAYERS = {"fp8": (nn.Linear, nn.Conv2d), "int8": (nn.Linear,)}


class Upcast(nn.Module):
    """The parametrization of an fp8-stored weight: the stored tensor in the compute dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)


def stored_layers(modules: list[nn.Module], storage: str) -> list[nn.Module]:
    """The layers of ``modules`` that ``storage`` stores in 8 bits: of its layer types and with no trainable tensor
    (``int8``: also not the ``base`` of a wrapper other than a LoRA layer without DoRA, since the wrapper would read
    the int8 weight itself)."""
    from ..layers.lora import LoRAConv2d, LoRALinear

    types = STORED_LAYERS[storage]
    reads_weight: set[int] = set()  # layers whose weight a wrapper reads outside their forward
    for module in modules:
        for parent in module.modules():
            base = getattr(parent, "base", None)
            plain_lora = isinstance(parent, (LoRALinear, LoRAConv2d)) and not parent.dora
            if storage == "int8" and isinstance(base, nn.Module) and not plain_lora:
                reads_weight.add(id(base))
    chosen, seen = [], set()
    for module in modules:
        for layer in module.modules():
            if type(layer) not in types or id(layer) in seen or id(layer) in reads_weight:
                continue
            seen.add(id(layer))
            if not parametrize.is_parametrized(layer) and not any(p.requires_grad for p in layer.parameters()):
                chosen.append(layer)
    return chosen


def store_frozen_base(modules: list[nn.Module], storage: str, mixed_precision: str = "no") -> int:
    """Stores the frozen layers of ``modules`` in ``storage`` (``none``: nothing); returns how many layers changed.

    Args:
        mixed_precision: The running precision (``no``, ``fp16``, ``bf16``): fp8 weights are upcast to it.
    """
    if storage == "none":
        return 0
    layers = stored_layers(modules, storage)
    if storage == "fp8":
        compute = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
        for layer in layers:
            layer.weight = nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
            parametrize.register_parametrization(layer, "weight", Upcast(compute), unsafe=True)
    else:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        for layer in layers:
            quantize_(layer, Int8WeightOnlyConfig())
    logger.info(f"train.base_storage={storage}: {len(layers)} frozen layers stored in 8 bits")
    return len(layers)


def stored_weight(layer: nn.Module) -> torch.Tensor:
    """The weight tensor a layer keeps (an fp8 layer's stored tensor, not its upcast view)."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: a tensor subclass (torchao's ``Int8Tensor``) counts its inner tensors (int8 data and
    scales)."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)
    return tensor.numel() * tensor.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored."""
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))
