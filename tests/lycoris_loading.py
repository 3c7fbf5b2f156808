"""lycoris-lora's kohya loader on a diffusers Stable Diffusion pipeline, shared by the tests that read kohya files
with it (LyCORIS exports, the kohya file a personalization run writes)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

#: lycoris-lora's kohya network on a diffusers SD U-Net and CLIP text encoder: its "full" preset also lists
#: TimestepEmbedding (for Anima), which makes time_embedding.linear_1 twice and fails lycoris' duplicate check.
SD_PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}


@contextlib.contextmanager
def sd_preset() -> Iterator[type]:
    """lycoris-lora's kohya network class with :data:`SD_PRESET`, its class-level preset restored afterwards."""
    from lycoris.kohya import LycorisNetworkKohya as network

    saved = {name: getattr(network, name) for name in vars(network) if name.isupper()}
    network.apply_preset(SD_PRESET)
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    try:
        yield network
    finally:
        for name, value in saved.items():
            setattr(network, name, value)


def apply_lycoris_file(pipe, file) -> torch.nn.Module:
    """Applies lycoris-lora's kohya loader (``create_network_from_weights``) from ``file`` to ``pipe``'s U-Net and text
    encoder; returns the network. The text encoder is handed over under ``text_model`` so lycoris names its modules
    as sd-scripts and A1111 do (transformers 5 dropped that level)."""
    from lycoris.kohya import create_network_from_weights

    text_model = torch.nn.Module()
    text_model.text_model = pipe.text_encoder
    network, _ = create_network_from_weights(1.0, str(file), None, text_model, pipe.unet)
    network.apply_to(text_model, pipe.unet, True, True)
    return network
