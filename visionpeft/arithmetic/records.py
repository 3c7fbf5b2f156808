"""Adapters as the arithmetic reads and writes them.

A visionpeft folder or a loaded model becomes an :class:`AdapterRecord`: its config (the ``visionpeft_config.json``
contents), its tensors under canonical names, and its LoRA updates grouped by the ``lora`` method that holds them
(:class:`LoRAGroup`, one per tower, since a tower carries one ``lora`` at most). A loaded model says which tensors
each method owns. A folder only names its methods, so its tensors are assigned by rule: a folder holding LoRA (and
task heads) only has its ``<update>.lora_A`` / ``.lora_B`` / ``.magnitude`` keys assigned to its ``lora`` methods by
their rank (and alpha, when ranks are equal: equal rank and alpha need no assignment, the scale is the same). A folder
where that cannot decide, or that also holds other methods, is read through its model instead (one line says so).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapter import methods_of
from ..checkpoint.folder import adapter_record, read_adapter_folder, write_adapter_folder
from ..errors import CheckpointError, ConfigError
from ..methods import make_config

LORA = "lora"
#: The canonical name suffixes of one LoRA update: its factors and, for DoRA, its magnitude vector.
FACTOR_A, FACTOR_B, MAGNITUDE = "lora_A", "lora_B", "magnitude"


def method_entry(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """A ``methods`` entry of a visionpeft config, the options checked and as the JSON file holds them."""
    return {"name": name, "config": json.loads(json.dumps(make_config(name, options).to_dict()))}


def natural_key(name: str) -> list:
    """Sort key reading digit runs as numbers (``blocks.2`` before ``blocks.10``), the order of a model's modules."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass
class Update:
    """One low-rank update ``delta W = scale * B @ A`` (A ``(r, in)`` or a conv's ``(r, in, kh, kw)``; B ``(out, r)``
    or ``(out, r, 1, 1)``), and DoRA's magnitude vector when it has one."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def folded_b(self) -> torch.Tensor:
        """B with the scale folded in (the update as PEFT holds an exported file: scale 1)."""
        return self.b * self.scale

    def product(self) -> torch.Tensor:
        """``B @ A`` without the scale, as a matrix ``(out, in * kh * kw)`` in float32."""
        return self.b.float().flatten(1) @ self.a.float().flatten(1)


@dataclass
class LoRAGroup:
    """The updates of one ``lora`` method: its position in the config's method list, its options, and its updates
    by canonical prefix (``blocks.0.attn.q``), in module order."""

    index: int
    options: dict[str, Any]
    updates: dict[str, Update]

    @property
    def tower(self) -> str | None:
        return self.options.get("tower")

    @property
    def rank(self) -> int:
        return int(self.options["r"])

    @property
    def scale(self) -> float:
        return float(self.options["alpha"]) / self.rank

    @property
    def dora(self) -> bool:
        return bool(self.options.get("use_dora"))

    def keys(self) -> set[str]:
        """The canonical tensor names this group's updates occupy."""
        suffixes = (FACTOR_A, FACTOR_B) + ((MAGNITUDE,) if self.dora else ())
        return {f"{prefix}.{suffix}" for prefix in self.updates for suffix in suffixes}


@dataclass
class AdapterRecord:
    """An adapter read from a folder or a loaded model.

    Attributes:
        label: How messages name it (the folder, or ``adapter 2 (a loaded model)``).
        config: The visionpeft config (``methods``, ``backbone``, ``base_model``, ``versions``, maybe ``task``).
        tensors: Every tensor under its canonical name, on the CPU.
        groups: The LoRA updates by ``lora`` method; None when a folder does not say which tensors are LoRA's.
        unassigned: Why ``groups`` is None.
    """

    label: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    groups: list[LoRAGroup] | None
    unassigned: str = ""
    other_methods: list[str] = field(default_factory=list)

    def lora_groups(self) -> list[LoRAGroup]:
        """The LoRA groups; a folder that does not assign its tensors is one :class:`CheckpointError`."""
        if self.groups is None:
            raise CheckpointError(self.unassigned)
        return self.groups

    def rest(self) -> dict[str, torch.Tensor]:
        """The tensors outside the LoRA updates: the task heads (and other methods' tensors)."""
        taken = set().union(*(g.keys() for g in self.lora_groups()))
        return {k: v for k, v in self.tensors.items() if k not in taken}

    def base_sha256(self) -> str | None:
        base = self.config.get("base_model")
        return base.get("sha256") if isinstance(base, dict) else None


def read_adapter(source: Any, label: str | None = None) -> AdapterRecord:
    """Reads a visionpeft adapter folder (a path) or the adapter attached to a model (or pipeline).

    Raises:
        CheckpointError: Not a visionpeft folder, or LoRA tensors that do not form updates (a factor missing,
            ranks that disagree).
        ConfigError: A model without an attached method.
    """
    if isinstance(source, (str, os.PathLike)):
        config, tensors = read_adapter_folder(source)
        record = AdapterRecord(label or str(source), config, tensors, None)
        _assign_folder(record)
        return record
    tensors, config = adapter_record(source)
    record = AdapterRecord(label or "the loaded model", config, tensors, [])
    for index, method in enumerate(methods_of(source)):
        if method.name != LORA:
            record.other_methods.append(method.name)
            continue
        names = [name for name, _ in method.named_state()]
        record.groups.append(_group(record, index, {name: tensors[name] for name in names}))
    return record


def _assign_folder(record: AdapterRecord) -> None:
    """Fills ``record.groups`` from a folder's tensors, or says in ``record.unassigned`` why it cannot."""
    methods = record.config["methods"]
    entries = [(i, m) for i, m in enumerate(methods) if m["name"] == LORA]
    record.other_methods = [m["name"] for m in methods if m["name"] != LORA]
    if not entries:
        record.groups = []
        return
    if record.other_methods:
        record.unassigned = (
            f"{record.label} holds {', '.join(record.other_methods)} beside lora, and a folder does not say which "
            "tensors are LoRA's: load it onto its base model (vp.load_adapter) and pass the model instead"
        )
        return
    lora_keys = [k for k in record.tensors if k.rpartition(".")[2] in (FACTOR_A, FACTOR_B, MAGNITUDE)]
    by_group: dict[int, dict[str, torch.Tensor]] = {i: {} for i, _ in entries}
    for key in lora_keys:
        prefix = key.rpartition(".")[0]
        a = record.tensors.get(f"{prefix}.{FACTOR_A}")
        owners = [i for i, m in entries if a is not None and int(m["config"].get("r", -1)) == a.shape[0]]
        scales = {float(methods[i]["config"]["alpha"]) / int(methods[i]["config"]["r"]) for i in owners}
        if len(owners) > 1 and len(scales) == 1:  # one scale: the owner only names the tower; guess it by prefix
            owners = _by_tower_prefix(key, owners, methods)
        if len(owners) > 1 and len(scales) > 1:
            record.unassigned = (
                f"{record.label} holds several lora methods of rank {a.shape[0]} with different alphas, and a folder "
                "does not say which tensors are whose: load it onto its base model and pass the model instead"
            )
            return
        if not owners:
            rank = "no lora_A" if a is None else f"rank {a.shape[0]}"
            raise CheckpointError(
                f"{record.label}: {key} belongs to no lora method ({rank}; methods: {_ranks(entries)})"
            )
        by_group[owners[0]][key] = record.tensors[key]
    record.groups = [_group(record, i, by_group[i]) for i, _ in entries]


def _by_tower_prefix(key: str, owners: list[int], methods: list) -> list[int]:
    """The owners whose tower names the key's first part (``text_encoder.``, ``text.``), else those on the default
    tower: canonical names of a tower other than the default start with its name (module paths of a pipeline's
    components too)."""
    towers = {i: methods[i]["config"].get("tower") for i in owners}
    named = [i for i in owners if towers[i] and key.startswith(towers[i] + ".")]
    return named or [i for i in owners if not towers[i]] or owners


def _ranks(entries: list) -> str:
    return ", ".join(f"r={m['config'].get('r')}" for _, m in entries)


def _group(record: AdapterRecord, index: int, tensors: dict[str, torch.Tensor]) -> LoRAGroup:
    """The updates of one lora method from its tensors (canonical names)."""
    options = record.config["methods"][index]["config"]
    scale = float(options["alpha"]) / int(options["r"])
    prefixes = sorted({k.rpartition(".")[0] for k in tensors}, key=natural_key)
    updates = {}
    for prefix in prefixes:
        a, b = tensors.get(f"{prefix}.{FACTOR_A}"), tensors.get(f"{prefix}.{FACTOR_B}")
        if a is None or b is None:
            missing = FACTOR_A if a is None else FACTOR_B
            raise CheckpointError(f"{record.label}: {prefix} has no {missing}; a LoRA update needs both factors")
        if a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{record.label}: {prefix} has lora_A of rank {a.shape[0]} and lora_B of rank {b.shape[1]}"
            )
        updates[prefix] = Update(a, b, scale, tensors.get(f"{prefix}.{MAGNITUDE}"))
    return LoRAGroup(index, dict(options), updates)


def check_same_base(records: list[AdapterRecord], check_base: bool = True) -> None:
    """All records adapt one base: the same backbone description and, unless ``check_base`` is False, the same
    recorded frozen-weights sha256 (where both record one).

    Raises:
        CheckpointError: Another architecture or other base weights, naming both adapters.
    """
    first = records[0]
    for other in records[1:]:
        mine, theirs = _architecture(first), _architecture(other)
        if mine != theirs:
            raise CheckpointError(
                f"{first.label} and {other.label} adapt different bases ({backbone_summary(mine)} vs "
                f"{backbone_summary(theirs)}); adapters combine only on the model they were trained on"
            )
        ours, yours = first.base_sha256(), other.base_sha256()
        if check_base and ours and yours and ours != yours:
            raise CheckpointError(
                f"{first.label} and {other.label} were trained on different base weights (frozen-weights sha256 "
                f"{ours[:12]} vs {yours[:12]}); pass check_base=False (command line: --ignore-base-mismatch) to "
                "combine them anyway"
            )


def _architecture(record: AdapterRecord) -> dict[str, Any]:
    backbone = dict(record.config.get("backbone") or {})
    backbone.pop("modules_to_save", None)  # which modules are heads is the adapter's choice, not the base's
    return backbone


def backbone_summary(backbone: dict[str, Any]) -> str:
    """A backbone description (``Backbone.describe()``) in words: ``timm_vit VisionTransformer [vision 12 blocks]``."""
    towers = ", ".join(f"{k} {v} blocks" for k, v in (backbone.get("towers") or {}).items())
    return f"{backbone.get('family')} {backbone.get('class')}" + (f" [{towers}]" if towers else "")


def check_output(output: str | os.PathLike, inputs: list[Any]) -> Path:
    """``output`` is a new or empty folder and none of the input folders (checked before any work).

    Raises:
        ConfigError: A file, a folder holding files, or an input.
    """
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output {path} is a file; give a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"output {path} holds files; give a new or empty folder (nothing is written over)")
    for source in inputs:
        if isinstance(source, (str, os.PathLike)) and Path(source).resolve() == path.resolve():
            raise ConfigError(f"output {path} is an input; give another folder")
    return path


@dataclass
class LayerFit:
    """How one update came out: its rank and the relative error ``||target - B A||_F / ||target||_F``."""

    rank: int
    relative_error: float


@dataclass
class AdapterResult:
    """A new adapter made by the arithmetic: what its visionpeft folder holds, and how each layer came out.

    Attributes:
        config: The visionpeft config.
        tensors: The tensors under canonical names.
        layers: Canonical update name -> :class:`LayerFit` (the operations that approximate: resize, extract,
            the ``*svd`` combinations).
        notes: Lines worth telling the user (padded ranks, tensors a LoRA cannot express).
        output: The folder written, when one was.
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    layers: dict[str, LayerFit] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    output: Path | None = None

    def __post_init__(self) -> None:
        self.config = json.loads(json.dumps(self.config))  # as the config file holds it (lists, not tuples)

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the visionpeft folder (``directory`` new or empty); ``vp.load_adapter`` loads it, and
        ``vp.save_adapter(model, ..., format="peft" | "kohya" | "diffusers")`` exports it from the loaded model."""
        path = check_output(directory, [])
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        self.output = write_adapter_folder(path, tensors, self.config)
        return self.output

    def summary(self) -> list[str]:
        """The per-layer table (rank, relative error) and the notes, as printable lines."""
        lines = []
        if self.layers:
            width = max(len(name) for name in self.layers)
            lines.append(f"{'layer':<{width}}  rank  relative error")
            for name, fit in self.layers.items():
                lines.append(f"{name:<{width}}  {fit.rank:>4}  {fit.relative_error:.2e}")
            errors = [fit.relative_error for fit in self.layers.values()]
            lines.append(
                f"{len(errors)} layers; relative error mean {sum(errors) / len(errors):.2e}, max {max(errors):.2e}"
            )
        return lines + self.notes
