"""Adapter files: what a trained adapter is on disk and how it travels.

* ``folder``: ``save_adapter`` / ``load_adapter`` (``visionpeft_adapter.safetensors`` + ``visionpeft_config.json``,
  PEFT's own files beside them when representable).
* ``exporters``: the methods' export parts combined into PEFT / diffusers / kohya files.
* ``conversions``: ``import_lora`` (kohya / diffusers single-file LoRA) and ``export_merged``.
* ``base_weights``: the source and fp16 sha256 of the frozen weights an adapter was trained on.
* ``hub_io``: model cards, upload and download through ``huggingface_hub``.
"""

from __future__ import annotations

from .conversions import export_merged, import_lora
from .folder import load_adapter, save_adapter

__all__ = ["export_merged", "import_lora", "load_adapter", "save_adapter"]
