"""Which base weights an adapter was trained on: a source name and a content hash of the frozen weights.

An adapter is a difference to particular weights; loaded onto other weights (another fine-tune of the same
architecture, a different release of a checkpoint) it runs without complaint and gives quietly wrong outputs.
Checkpoints therefore record ``base_model`` = the weights' source (hub id / timm tag / local path, when the model
knows it) and ``sha256`` of every frozen parameter of the adapted model, and :func:`visionpeft.load_adapter`
refuses other weights unless asked.

The hash covers the parameters that do not train (``requires_grad`` false) with the methods attached, in module
order, each cast to float16 first, so the same checkpoint loaded in float32 or float16 hashes the same
(bfloat16 keeps other bits: when exactly one side is bfloat16 the check cannot tell, and ``load_adapter`` says so in a
warning instead of refusing).
Tensors trained in place (BitFit biases, full fine-tuning) are part of the adapter, not of the base. The hash is
computed once per set of attached methods and cached on the model (frozen weights do not change while training;
trainers compute it before casting frozen weights to the mixed-precision dtype).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..adapter import require_state, unwrap

HASHED_AS = "float16"


def weights_source(model: Any) -> str | None:
    """The name the weights were loaded by, when the model records it: what visionpeft's model factory loaded (a
    timm name with tag, an open_clip model / tag, a local file), a diffusers ``_name_or_path``, a timm
    ``hf_hub_id`` / ``architecture.tag``."""
    candidates = [model, unwrap(model)]
    inner = getattr(unwrap(model), "inner_model", None)
    if callable(inner):
        candidates.append(inner())
    for obj in candidates:
        tag = getattr(obj, "_visionpeft_source", None)  # set by visionpeft's model factory
        if isinstance(tag, str):
            return tag
        config = getattr(obj, "config", None)
        name = getattr(config, "_name_or_path", None) or getattr(obj, "name_or_path", None)
        if isinstance(name, str) and name:
            return name
        pretrained = getattr(obj, "pretrained_cfg", None)
        if isinstance(pretrained, dict) and (pretrained.get("hf_hub_id") or pretrained.get("architecture")):
            tag = pretrained.get("tag")
            return pretrained.get("hf_hub_id") or pretrained["architecture"] + (f".{tag}" if tag else "")
    return None


def frozen_weights_sha256(model: Any) -> str:
    """sha256 of the frozen parameters of an adapted model (see the module docstring); cached per method set."""
    module = unwrap(model)
    state = require_state(module)
    frozen = [p for p in module.parameters() if not p.requires_grad]  # tied weights are yielded once
    key = (tuple((id(m), type(m).__name__) for m in state.methods), len(frozen), sum(p.numel() for p in frozen))
    cached = module.__dict__.get("_visionpeft_base_sha256")
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    for parameter in frozen:
        tensor = parameter.detach().to("cpu", torch.float16).contiguous()
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    value = digest.hexdigest()
    module.__dict__["_visionpeft_base_sha256"] = (key, value)
    # the dtype hashed, kept past a later half-precision cast
    module.__dict__["_visionpeft_base_dtype"] = str(frozen[0].dtype).removeprefix("torch.") if frozen else None
    return value


def frozen_dtype(model: Any) -> str | None:
    """The dtype the frozen weights were hashed in (``float32``, ``bfloat16``, ...), or None when nothing is frozen."""
    frozen_weights_sha256(model)
    return unwrap(model).__dict__["_visionpeft_base_dtype"]


def describe_base(model: Any) -> dict[str, Any]:
    """The ``base_model`` entry of an adapter config."""
    sha256 = frozen_weights_sha256(model)
    return {"source": weights_source(model), "sha256": sha256, "hashed_as": HASHED_AS, "dtype": frozen_dtype(model)}
