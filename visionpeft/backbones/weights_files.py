"""Local weights files (``model.checkpoint``): read safely, loaded into a model built without weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a weights file: safetensors, or a PyTorch pickle loaded with ``weights_only=True`` (never arbitrary
    objects). Nested ``{"state_dict": ...}`` / ``{"model": ...}`` checkpoints are unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign files: one line, whatever the loader raised
        raise ModelLoadError(f"cannot read checkpoint {path}: {str(err).splitlines()[0][:160]}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, head: str | None = None) -> None:
    """Loads ``state`` into ``model``; tensors under ``head`` (a module path plus a dot) of another shape are left
    out and missing ones allowed (a classifier of another size keeps its fresh init). Anything else that does not
    fit is one line naming up to three keys."""
    own = model.state_dict()
    under_head = (lambda key: key.startswith(head)) if head else (lambda key: False)
    dropped = {k for k in state if under_head(k) and (k not in own or own[k].shape != state[k].shape)}
    state = {k: v for k, v in state.items() if k not in dropped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not under_head(k)]
    shapes = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        detail = (missing or unexpected or shapes)[:3]
        raise ModelLoadError(f"checkpoint {path} does not fit {type(model).__name__}: e.g. {', '.join(detail)}")
