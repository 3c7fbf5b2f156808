"""What ``visionpeft eval`` / ``predict`` hand a task's evaluator / predictor, and what those share.

The commands name no task: :func:`load_run` reads a run folder's config (or says in one line what kind of folder it
was given instead), the run's :class:`~visionpeft.config.tasks.TaskSpec` names the evaluator / predictor, and the
command calls it with an :class:`EvalRequest` / :class:`PredictRequest`; it returns the lines to print. Shared here:
which adapter folder of a run is used (:func:`adapter_dir`), where generated files go (:func:`eval_folder`: never a
folder holding files) and how they are written (:func:`check_outputs` + :func:`write_new`: never over an input, and
never over an existing file unless asked). Torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..io import atomic_write
from .run_state import claim_new_folder

#: the adapter folders of a run, in the order a default pick prefers them (the one chosen on val, the final
#: export, the latest state's copy)
ADAPTER_FOLDERS = ("best", "adapter", "last")
#: ``RUN/<this>/``: the default parent of what ``eval`` generates
EVAL_FOLDER = "eval"
#: white pixels between (and around) the cells of the grids ``eval`` writes
GRID_GAP = 4


@dataclass
class EvalRequest:
    """``visionpeft eval`` options (None: the run's own setting).

    Attributes:
        run_dir: The run folder. checkpoint: Its adapter folder (default: :func:`adapter_dir`'s pick).
        split: Dataset split. batch_size: Evaluation batch. mode: ``whole`` / ``slide`` inference.
        samples: Images to generate (per prompt, per class, held-out pairs). clip: The CLIP that scores images.
        out: Folder receiving generated images (default ``RUN/eval/<adapter>``). cpu: Stay on the CPU.
        check_base: Refuse adapters trained on other base weights.
    """

    run_dir: Path
    checkpoint: str | None = None
    split: str | None = None
    batch_size: int | None = None
    mode: str | None = None
    samples: int | None = None
    clip: str | None = None
    out: Path | None = None
    cpu: bool = False
    check_base: bool = True


@dataclass
class PredictRequest:
    """``visionpeft predict`` options.

    Attributes:
        run_dir: The run folder. inputs: Image files (or class names for a class-conditional run). out: Where the
        results go. checkpoint: The adapter folder. mode: ``whole`` / ``slide``. top_k: Classes per image.
        batch_size: Images per forward pass. prompt: Prompts (one for all inputs, or one each). seeds: Sampling
        seeds. overwrite: Replace existing output files. cpu: Stay on the CPU. check_base: Refuse adapters
        trained on other base weights.
    """

    run_dir: Path
    inputs: list[str] = field(default_factory=list)
    out: Path | None = None
    checkpoint: str | None = None
    mode: str | None = None
    top_k: int | None = None
    batch_size: int | None = None
    prompt: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    overwrite: bool = False
    cpu: bool = False
    check_base: bool = True


def _folder_kind(path: Path) -> tuple[str, str] | None:
    """(what a folder that is not a run is, what to do instead), or None when it is nothing recognisable."""
    from ..checkpoint.folder import CONFIG_NAME, LEGACY_NAMES

    if (path / "sweep.yaml").is_file():
        kind, hint = (
            "a sweep folder (sweep.yaml)",
            f"its runs are in {path / 'runs'} (`visionpeft sweep {path} --report`)",
        )
    elif (path / "model_index.json").is_file():
        kind, hint = (
            "a diffusers pipeline folder (model_index.json)",
            f"`visionpeft generate --model {path}` draws from it",
        )
    else:
        name = next((n for n in (CONFIG_NAME, *LEGACY_NAMES) if (path / n).is_file()), None)
        if name is None:
            return None
        kind, hint = f"an adapter folder ({name})", "give the run folder that holds it"
    return kind, f"its run is {path.parent}" if (path.parent / "config.yaml").is_file() else hint


def load_run(run_dir: Path, command: str):
    """``(config, TaskSpec)`` of the run in ``run_dir``; a folder of another kind (an adapter, a sweep, a pipeline,
    an empty folder, a file) is a :class:`CheckpointError` saying what it is and what ``command`` expects."""
    from ..config import load_config, task_spec

    expected = f"{command} takes a run folder (config.yaml + saved adapters)"
    if not run_dir.exists():
        raise CheckpointError(f"{run_dir} does not exist; {expected}")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file, not a run folder; {expected}")
    if not (run_dir / "config.yaml").is_file():
        kind = _folder_kind(run_dir)
        if kind is not None:
            raise CheckpointError(f"{run_dir} is {kind[0]}, not a run; {expected}: {kind[1]}")
        what = "an empty folder" if not any(run_dir.iterdir()) else "not a run folder (no config.yaml)"
        raise CheckpointError(f"{run_dir} is {what}; {expected}")
    config = load_config(run_dir / "config.yaml")
    return config, task_spec(config.task)


def adapter_dir(run_dir: Path, checkpoint: str | None) -> Path:
    """The adapter folder ``checkpoint`` of the run, or the first of :data:`ADAPTER_FOLDERS` it holds."""
    if checkpoint:
        path = run_dir / checkpoint
        if not path.is_dir():
            held = [name for name in ADAPTER_FOLDERS if (run_dir / name).is_dir()]
            raise CheckpointError(
                f"{path} does not exist; {run_dir} holds {', '.join(f'{n}/' for n in held) or 'no adapter folder'}"
            )
        return path
    for name in ADAPTER_FOLDERS:
        if (run_dir / name).is_dir():
            return run_dir / name
    raise CheckpointError(
        f"{run_dir} holds no saved adapter yet (best/, adapter/ or last/ are written at epoch ends and at the end; "
        f"--resume {run_dir} continues the run)"
    )


def check_eval_out(out: Path | None) -> None:
    """``eval``'s ``--out`` is a new or empty folder (checked before any work; created by :func:`eval_folder`)."""
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a new or empty folder")
    if out is not None and out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} holds files; give a new or empty folder (eval never writes over files)")


def eval_folder(request: EvalRequest, name: str) -> Path:
    """A new folder for what an evaluation generates: ``--out`` (new or empty), else ``RUN/eval/<name>`` (or
    ``<name>-2``, ``-3``, ... beside earlier evaluations, which stay as they are)."""
    if request.out is not None:
        check_eval_out(request.out)
        _mkdir(request.out, exist_ok=True)
        return request.out
    parent = request.run_dir / EVAL_FOLDER
    _mkdir(parent, exist_ok=True)
    return claim_new_folder(parent / name)  # claimed atomically: two evaluations at once get two folders


def _mkdir(path: Path, exist_ok: bool) -> None:
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except OSError as err:
        raise ConfigError(f"{path}: cannot create the folder ({err.strerror or err})") from None


def output_folder(out: Path | None) -> Path:
    """``predict``'s ``--out`` as a folder (created; a file there is a :class:`ConfigError`)."""
    if out is None:
        raise ConfigError("--out is required: the folder receiving the outputs")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    _mkdir(out, exist_ok=True)
    return out


def check_outputs(outputs: Sequence[Path], inputs: Iterable[Path], overwrite: bool) -> None:
    """Before any work: no output is an input (refused even with ``--overwrite``), no two outputs share a name,
    and none exists unless ``overwrite``."""
    given = {Path(p).resolve(): Path(p) for p in inputs}
    seen: set[Path] = set()
    for out in outputs:
        resolved = out.resolve()
        if resolved in given:
            raise ConfigError(f"{out} would replace the input {given[resolved]}; give another --out")
        if resolved in seen:
            raise ConfigError(f"two inputs would both write {out}; give them different file names")
        seen.add(resolved)
    existing = [out for out in outputs if out.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise _exists(existing[0], more)


def write_new(path: Path, data: bytes, overwrite: bool = False) -> Path:
    """Writes ``data`` to ``path``: a new file only (created exclusively, so a file that appeared meanwhile is
    kept), or, with ``overwrite``, replaced atomically."""
    if overwrite:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        return path
    try:
        with open(path, "xb") as file:
            file.write(data)
    except FileExistsError:
        raise _exists(path) from None
    return path


def _exists(path: Path, more: str = "") -> ConfigError:
    return ConfigError(f"{path} exists{more}; predict never writes over files: give another --out, or --overwrite")


def readable_grid(rows: Sequence[Sequence[Any]]) -> Any:
    """Rows of generated PIL images as one picture: small ones enlarged (nearest) to cells of at least 128 px,
    white lines between them (:func:`visionpeft.data.image_grid.image_grid`)."""
    from ..data.image_grid import image_grid, scale_for

    return image_grid(rows, scale=scale_for(rows[0][0].height), gap=GRID_GAP, margin=GRID_GAP)


def png_bytes(image: Any) -> bytes:
    """A PIL image encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe short form of ``text`` (prompts and class names in output names)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "x"


def device_of(cpu: bool) -> str:
    """``cuda`` when a GPU is present and ``cpu`` is not asked for."""
    import torch

    return "cuda" if torch.cuda.is_available() and not cpu else "cpu"


def adapted_pipeline(model: Any, adapter: Path, cpu: bool, check_base: bool):
    """(the run's diffusers pipeline with the saved ``adapter`` loaded and on the device, the accelerator): what the
    generative tasks' evaluators and predictors sample with, through their trainers' own validation code.

    Args:
        model: The run's ``model`` section: ``name``, and ``vae`` where the task has one (the VAE that replaced the
            pipeline's while training, SDXL's fp16-fix: samples are decoded with it as the trainer's were).
    """
    import visionpeft as vp

    from ..backbones.diffusers_loading import load_pipeline, replace_vae
    from .loop import LoopConfig, make_accelerator

    pipeline = load_pipeline(model.name)
    if model.get("vae") is not None:
        replace_vae(pipeline, model.vae, "model.vae")
    vp.load_adapter(pipeline, adapter, check_base=check_base)
    accelerator = make_accelerator(LoopConfig(), cpu=cpu)
    pipeline.to(accelerator.device)
    return pipeline, accelerator
