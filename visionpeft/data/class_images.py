"""The class images of prior preservation, generated once and cached by what makes them.

DreamBooth's prior preservation trains on images the base model draws from the class prompt. diffusers' example
reuses whatever its class folder holds; here the images live in a cache folder, one entry per key: the sha256 of
:func:`class_image_fields`' JSON (the base model's frozen-weights sha256 - what a saved adapter records as
``base_model.sha256`` -, its source, the prompt, the count, the resolution and the sampler settings). A second run
with the same key reuses the entry; a change to any of them is another key, so the images are generated anew. An
entry is written to a hidden ``.<key>.tmp`` folder and renamed when complete, under a file lock, so a run killed
halfway leaves nothing that a later run would take for a finished entry, and two runs starting at once generate it
once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

RECORD = "class_images.json"


def class_image_fields(
    base_sha256: str, source: str | None, prompt: str, count: int, size: tuple[int, int], sampler: dict[str, Any]
) -> dict[str, Any]:
    """What the class images depend on (``size`` is (width, height); ``sampler`` the sampling settings)."""
    return {
        "base_weights_sha256": base_sha256,
        "model": source,
        "prompt": prompt,
        "count": count,
        "width": size[0],
        "height": size[1],
        "sampler": sampler,
    }


def class_image_key(fields: dict[str, Any]) -> str:
    """The cache key of ``fields``: the first 16 hex digits of the sha256 of their sorted JSON."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def entry_files(entry: Path) -> list[Path] | None:
    """The images of a complete cache entry, or None when it is missing or incomplete."""
    try:
        record = json.loads((entry / RECORD).read_text())
        files = [entry / name for name in record["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if all(f.is_file() for f in files) else None


def cached_class_images(
    root: str | Path, fields: dict[str, Any], generate: Callable[[int], Image.Image]
) -> tuple[Path, bool]:
    """The cache entry holding ``fields["count"]`` class images for ``fields``, generated on a miss.

    Args:
        root: The cache folder (created when missing).
        fields: What the images depend on (:func:`class_image_fields`).
        generate: Draws image ``i`` (called for ``i = 0, 1, ...`` in order, on a miss only).

    Returns:
        The entry folder and whether it was reused.
    """
    from filelock import FileLock

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = class_image_key(fields)
    entry = root / key
    if entry_files(entry) is not None:
        return entry, True
    with FileLock(str(root / f".{key}.lock")):
        if entry_files(entry) is not None:  # another run finished it while this one waited
            return entry, True
        partial = root / f".{key}.tmp"
        for stale in (partial, entry):  # an interrupted run's, or an entry whose images were deleted
            if stale.exists():
                shutil.rmtree(stale)
        partial.mkdir()
        names = []
        for index in range(fields["count"]):
            name = f"class_{index:04d}.png"
            generate(index).save(partial / name)
            names.append(name)
        (partial / RECORD).write_text(json.dumps({**fields, "files": names}, indent=1, default=str) + "\n")
        partial.rename(entry)
    logger.info("generated %d class images in %s", len(names), entry)
    return entry, False
