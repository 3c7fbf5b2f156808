"""What a saved adapter folder holds, in lines (``visionpeft adapters inspect``): its methods and their options, the
LoRA ranks (stored and in use), targets, layer and parameter counts, task heads, the base weights it was trained on
and the files beside it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .records import LoRAGroup, backbone_summary, read_adapter


def describe_adapter(folder: str | os.PathLike) -> list[str]:
    """Lines describing the visionpeft adapter folder ``folder``.

    Raises:
        CheckpointError: Not a visionpeft adapter folder, or a damaged one.
    """
    record = read_adapter(folder)
    config = record.config
    lines = [f"adapter: {folder}"]
    lines.append(f"backbone: {backbone_summary(config.get('backbone') or {})}")
    lines.append(f"base weights: {_base(config.get('base_model'))}")
    lines.append("methods:")
    groups = {g.index: g for g in record.groups or []}
    for index, entry in enumerate(config["methods"]):
        lines.append(f"  {entry['name']}: {_options(entry.get('config', {}))}")
        if index in groups:
            lines.extend(f"    {line}" for line in _lora_lines(groups[index]))
    if record.groups is None:
        lines.append(f"  (per-method counts need the model: {record.unassigned.split(': ')[0]})")
    else:
        rest = record.rest()
        if rest:
            shown = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(rest.items())[:4])
            more = f" (+{len(rest) - 4} more)" if len(rest) > 4 else ""
            what = "task heads" if not record.other_methods else "other tensors (task heads, other methods)"
            lines.append(f"{what}: {shown}{more}; {_count(rest):,} parameters")
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in record.tensors.values()})
    lines.append(f"tensors: {len(record.tensors)}, {_count(record.tensors):,} parameters ({', '.join(dtypes)})")
    if "task" in config:
        lines.append(f"task record: {', '.join(sorted(config['task']))}")
    versions = config.get("versions") or {}
    lines.append("saved with: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append("files: " + ", ".join(sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("."))))
    return lines


def _base(base: object) -> str:
    if not isinstance(base, dict):
        return "not recorded (saved before visionpeft recorded base weights)"
    sha = base.get("sha256") or "?"
    source = base.get("source") or "unnamed"
    return f"{source}; frozen-weights sha256 {sha[:16]}... ({base.get('dtype')}, hashed as {base.get('hashed_as')})"


def _options(options: dict) -> str:
    """The options that say something (set, and ``targets`` only where no ``target_modules`` replaces them)."""
    ignored = {"targets"} if options.get("target_modules") is not None else set()
    return ", ".join(f"{k}={v}" for k, v in options.items() if v not in (None, [], ()) and k not in ignored)


def _lora_lines(group: LoRAGroup) -> list[str]:
    """Layers, ranks in use and parameters of one lora method."""
    in_use = sorted({_rank_in_use(u.a, u.b) for u in group.updates.values()})
    ranks = "none" if not in_use else f"{in_use[0]}" if len(in_use) == 1 else f"{in_use[0]} to {in_use[-1]}"
    count = sum(_count({"a": u.a, "b": u.b}) for u in group.updates.values())
    count += sum(u.magnitude.numel() for u in group.updates.values() if u.magnitude is not None)
    names = list(group.updates)
    more = f" (+{len(names) - 4} more)" if len(names) > 4 else ""
    return [
        f"{len(names)} {'DoRA' if group.dora else 'LoRA'} layer{'s' * (len(names) != 1)}, stored rank {group.rank} "
        f"(scale alpha / r = "
        f"{group.scale:g}), rank in use {ranks}; {count:,} parameters",
        f"layers: {', '.join(names[:4])}{more}",
    ]


def _rank_in_use(a: torch.Tensor, b: torch.Tensor) -> int:
    """The rank directions that contribute: rows of A that are not zero meeting columns of B that are not (a
    resized or imported LoRA stores zero-padded ones)."""
    rows = a.flatten(1).abs().sum(1) > 0
    columns = b.transpose(0, 1).flatten(1).abs().sum(1) > 0
    return int((rows & columns).sum())


def _count(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())
