"""Export of the pretrained tiny text-to-image pipeline: the ``save_pretrained`` folder plus its model card."""

from __future__ import annotations

import shutil
from pathlib import Path


def export_pipeline(config, run_dir: Path, target: Path, command: str, minutes: float) -> Path:
    """Copies ``RUN/pipeline`` to ``target`` and writes the model card ``README.md``."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(run_dir / "pipeline", target, dirs_exist_ok=True)
    (target / "README.md").write_text(f"# tiny_sd\n\nCommand: `{command}`\n")
    return target
