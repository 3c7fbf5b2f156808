"""The model card a finished run leaves in its folder (``README.md``), and its upload to the hub."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..adapter import attached_methods
from ..checkpoint.base_weights import weights_source
from ..checkpoint.hub_io import build_model_card, push_folder
from ..config import run_command, task_spec
from ..io import atomic_write

MAX_PICTURES = 8
#: What reads a run's output, by the first part of its path in the run folder.
OUTPUT_USES = {
    "adapter": "visionpeft: `vp.load_adapter(model, RUN_FOLDER / 'adapter')`",
    "diffusers": "diffusers: `pipeline.load_lora_weights(folder)`, `pipeline.load_textual_inversion(file)`",
    "merged": "diffusers: `from_pretrained(folder)` (the method merged into the weights)",
    "kohya": "A1111, ComfyUI, sd-scripts, lycoris-lora (kohya layout; textual inversion's embeddings bundled)",
}


def numeric_results(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a run's results, flattened (``test/top1``); parameter counts are reported elsewhere."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        if key == "parameters":
            continue
        if isinstance(value, dict):
            flat.update(numeric_results(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def run_files(outputs: list, run_dir: Path) -> dict[str, str]:
    """The run's outputs inside its folder (relative paths, a folder with a trailing ``/``) and what reads each."""
    files = {}
    for output in map(Path, outputs):
        if not output.is_relative_to(run_dir) or output == run_dir:
            continue
        relative = output.relative_to(run_dir)
        files[f"{relative}/" if output.is_dir() else str(relative)] = OUTPUT_USES.get(relative.parts[0], "")
    return files


def run_pictures(run_dir: Path) -> list[str]:
    """The run's pictures (validation samples, prediction grids), relative to the run folder, newest last."""
    found = [p for p in run_dir.rglob("*.png") if not p.relative_to(run_dir).parts[0].startswith(("state", "tensorb"))]
    found.sort(key=lambda p: p.stat().st_mtime)
    return [str(p.relative_to(run_dir)) for p in found[-MAX_PICTURES:]]


def write_run_card(
    config: DictConfig, adapted: Any, results: dict[str, Any], summary: list[str], run_dir: Path
) -> Path:
    """Writes ``run_dir/README.md``: hub metadata, methods, trainable parameters, data, results, the command and
    the pictures of the run."""
    card = build_model_card(
        title=f"{run_dir.name}: {' + '.join(name for name, _ in attached_methods(adapted))} ({config.task})",
        base_model=weights_source(adapted) or config.model.get("name"),
        methods=[(name, cfg.to_dict()) for name, cfg in attached_methods(adapted)],
        parameters=results.get("parameters"),
        pipeline_tag=task_spec(config.task).pipeline_tag,
        license=config.train.get("license"),
        data="\n".join(f"- {line}" for line in summary) or None,
        metrics=numeric_results(results),
        files=run_files(results.get("outputs", []), run_dir),
        command=shlex.join(run_command()),
        images=run_pictures(run_dir),
        how_to_load="import visionpeft as vp\n\n"
        "vp.load_adapter(model, RUN_FOLDER / 'best' or 'last')  # model: the base model named above",
    )
    path = run_dir / "README.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text(str(card)))
    return path


def push_run(run_dir: Path, repo_id: str) -> str:
    """Uploads a finished run folder (adapters, exported files, card, pictures; no resumable state or logs)."""
    return push_folder(run_dir, repo_id)
