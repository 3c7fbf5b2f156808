"""What the few-shot CLIP methods after CoOp share (KgCoOp, ProGrad, CLIP-Adapter, Tip-Adapter): the class-name and
template checks, the text tower they need, the class text features of hand-crafted prompts, and the on-disk cache of
image features computed once from a few-shot set.

The hand-crafted class features are what every official implementation computes with its frozen CLIP: per class,
the L2-normalised text features of each template, averaged and normalised again (Tip-Adapter's ``clip_classifier``,
``utils.py`` lines 18-35; with one template - KgCoOp, ProGrad, CLIP-Adapter - the normalised features of that prompt).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, IncompatibleMethodError
from ..io import atomic_write


def check_classnames(method: str, classnames: Sequence[str]) -> None:
    """Every class has a name and no two classes share one (their prompts, hence their scores, would be equal).

    Raises:
        ConfigError: An empty name or a repeated one, naming its position(s).
    """
    seen: dict[str, int] = {}
    for index, name in enumerate(classnames):
        shown = str(name).replace("_", " ").strip()
        if not shown:
            raise ConfigError(f"{method} classnames: class {index} has an empty name; every class needs one")
        if shown in seen:
            raise ConfigError(
                f"{method} classnames: '{shown}' names both class {seen[shown]} and class {index}; class names must "
                "be distinct (both classes would get the same prompt)"
            )
        seen[shown] = index


def check_template(method: str, option: str, template: str) -> None:
    """A hand-crafted prompt holds exactly one ``{}`` where the class name goes."""
    if template.count("{}") != 1:
        raise ConfigError(
            f"{method} {option} {template!r} must hold exactly one '{{}}' where the class name goes, "
            "e.g. 'a photo of a {}.'"
        )


def require_text_tower(method: Any) -> None:
    """A method on CLIP's image side that scores against class text needs the model's text tower.

    Raises:
        IncompatibleMethodError: The model has no CLIP text tower (a vision-only model).
    """
    text = method.backbone.towers.get("text")
    if text is None or "text_prompts" not in text.capabilities:
        raise IncompatibleMethodError(
            f"{method.name} needs an open_clip model's text tower (class text features of its hand-crafted prompt); "
            f"the {method.backbone.family} model has none"
        )


def hand_crafted_text_features(backbone: Any, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Normalised class text features (n_cls, d) in float32 of the frozen text tower for ``templates`` (see the module
    docstring), without gradients; underscores in class names read as spaces."""
    names = [name.replace("_", " ") for name in classnames]
    device = backbone.logit_scale.device
    with torch.no_grad():
        per_template = []
        for template in templates:
            tokens = backbone.tokenize([template.format(name) for name in names]).to(device)
            features = backbone.encode_text_embeddings(backbone.token_embedding(tokens), tokens)
            per_template.append(F.normalize(features.float(), dim=-1))
        return F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)


def cache_key(fields: dict[str, Any]) -> str:
    """The first 16 hex digits of the sha256 of ``fields`` as sorted JSON."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_tensors(
    root: Path | None, fields: dict[str, Any], compute: Callable[[], dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], Path | None]:
    """``compute()``'s tensors, read from ``root/<key>.safetensors`` when an earlier call with the same ``fields``
    wrote them (``fields`` name the weights, the data and how the tensors are made), else computed and written there
    (atomically, ``fields`` in the file's metadata). ``root`` None: always computed, nothing written.

    Returns:
        The tensors (on the CPU when read) and the file (None without ``root``).
    """
    if root is None:
        return compute(), None
    from safetensors.torch import load_file, save_file

    path = Path(root) / f"{cache_key(fields)}.safetensors"
    if path.is_file():
        return load_file(str(path)), path
    tensors = compute()
    metadata = {"fields": json.dumps(fields, sort_keys=True, default=str)}
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))
    return tensors, path
