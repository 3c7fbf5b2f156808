"""Model cards and the Hugging Face hub: what an adapter folder tells the hub, uploads and downloads.

A card is ``README.md`` with the YAML metadata the hub reads (``base_model``, ``library_name``, ``tags``, ``license``,
``pipeline_tag``) and a body saying what was trained (methods, trainable parameters), on what data, with which
results, which files hold it and what reads each, by which command, with the validation pictures. It is built with
``huggingface_hub.ModelCard`` so the hub and ``ModelCard.load`` parse it. Uploads and downloads go through
``huggingface_hub`` (``upload_folder``, ``snapshot_download``); without a network they fail in one line instead of
retrying for a minute.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

#: Files of an adapter folder worth downloading (a run folder also holds resumable state and logs).
ADAPTER_PATTERNS = ("*.json", "*.safetensors", "README.md", "*.png", "*/*.json", "*/*.safetensors")
#: What a run folder upload leaves out.
RUN_IGNORE = ("state/*", "state.tmp/*", "state.old/*", "tensorboard/*", "*.tmp")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(text: str) -> bool:
    """``user/repo`` in the hub's spelling."""
    return bool(_REPO_ID.match(text))


def looks_like_repo_id(text: str | os.PathLike) -> bool:
    """``user/repo`` that is not an existing local path (nor a missing weights file)."""
    return (
        isinstance(text, str)
        and bool(_REPO_ID.match(text))
        and not Path(text).exists()
        and Path(text).suffix not in (".safetensors", ".bin", ".pt", ".json")
    )


def library_name(folder: Path) -> str:
    """The library that loads ``folder`` as it is: ``peft`` (PEFT's files), ``diffusers`` (LoRA / model
    folders diffusers reads, kohya single files included) or ``visionpeft``."""
    from .exporters import KOHYA_NAME

    if (folder / "adapter_config.json").is_file():
        return "peft"
    lora_files = ["pytorch_lora_weights.safetensors"]
    if not holds_lycoris_modules(folder / KOHYA_NAME):  # diffusers' load_lora_weights refuses LyCORIS modules
        lora_files.append(KOHYA_NAME)
    if any((folder / name).is_file() for name in lora_files) or any(folder.glob("*/config.json")):
        return "diffusers"
    return "visionpeft"


def holds_lycoris_modules(path: Path) -> bool:
    """Whether a kohya file is a LyCORIS network (its ``ss_network_module`` metadata, as sd-scripts writes it)."""
    if not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("ss_network_module") == "lycoris.kohya"


def build_model_card(
    *,
    title: str,
    base_model: str | None,
    methods: Iterable[tuple[str, Mapping[str, Any]]],
    parameters: Mapping[str, Any] | None = None,
    pipeline_tag: str | None = None,
    library: str = "visionpeft",
    license: str | None = None,
    data: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    files: Mapping[str, str] | None = None,
    command: str | None = None,
    images: Iterable[str] = (),
    how_to_load: str | None = None,
):
    """A ``huggingface_hub.ModelCard`` for an adapter (see the module docstring); ``files``: path in the folder ->
    what reads it ("" when nothing needs saying)."""
    from huggingface_hub import ModelCard, ModelCardData

    methods = list(methods)
    tags = ["visionpeft", *dict.fromkeys(name for name, _ in methods)]
    if library != "visionpeft":
        tags.insert(0, library)
    card_data = ModelCardData(
        base_model=base_model if base_model and is_repo_id(base_model) else None,  # the hub takes repo ids only
        library_name=library,
        tags=tags,
        license=license or None,
        pipeline_tag=pipeline_tag or None,
    )
    lines = [f"# {title}", ""]
    lines.append(
        f"An adapter of `{base_model or 'a model'}` trained with visionpeft (parameter-efficient fine-tuning)."
    )
    lines += ["", "## Methods", ""]
    for name, options in methods:
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
        lines.append(f"- **{name}**" + (f": {shown}" if shown else ""))
    if parameters:
        lines += ["", "## Trainable parameters", "", "| group | parameters |", "|---|---:|"]
        lines.append(f"| total trainable | {parameters.get('trainable', 0):,} |")
        for group, count in (parameters.get("by_group") or {}).items():
            lines.append(f"| {group} | {count:,} |")
        lines.append(f"| model total | {parameters.get('total', 0):,} |")
    if data:
        lines += ["", "## Data", "", data]
    if metrics:
        lines += ["", "## Results", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {_number(v)} |" for k, v in metrics.items()]
    if files:
        lines += ["", "## Files", ""] + [f"- `{path}`" + (f": {use}" if use else "") for path, use in files.items()]
    if command:
        lines += ["", "## How it was made", "", "```bash", command, "```"]
    if how_to_load:
        lines += ["", "## Use", "", "```python", how_to_load.strip(), "```"]
    pictures = list(images)
    if pictures:
        lines += ["", "## Pictures", ""] + [f"![{Path(p).stem}]({p})" for p in pictures]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    return ModelCard(content)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def push_folder(folder: Path, repo_id: str, ignore: Iterable[str] = RUN_IGNORE, private: bool = False) -> str:
    """Uploads ``folder`` to the hub model repo ``repo_id`` (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi, constants

    from ..backbones.hub import hub_reachable

    if constants.HF_HUB_OFFLINE or not hub_reachable():
        raise CheckpointError(f"cannot upload {folder} to the hub repo {repo_id}: the hub is not reachable (offline)")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, ignore_patterns=list(ignore), commit_message="Upload with visionpeft"
        )
    except Exception as err:  # the hub client raises many kinds (HTTP, offline, auth): all are one line here
        raise CheckpointError(f"cannot upload {folder} to the hub repo {repo_id}: {_reason(err)}") from None
    return str(getattr(info, "commit_url", info))


def download_adapter(repo_id: str) -> Path:
    """Downloads the adapter files of the hub repo ``repo_id`` (cached); returns the local folder."""
    from huggingface_hub import snapshot_download

    from ..backbones.hub import offline_unless_reachable

    try:
        with offline_unless_reachable():
            return Path(snapshot_download(repo_id, allow_patterns=list(ADAPTER_PATTERNS)))
    except Exception as err:  # offline, missing repo, no access: one line
        raise CheckpointError(f"cannot download the adapter {repo_id} from the hub: {_reason(err)}") from None


def _reason(err: Exception) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{type(err).__name__}: {text[:200]}"
