"""IP-Adapter-plus's image projection: diffusers' ``IPAdapterPlusImageProjection``, the official ``Resampler``
(tencent-ailab/IP-Adapter ``ip_adapter/resampler.py``) over the image encoder's penultimate patch features, built with
the shapes of ``tutorial_train_plus.py`` (lines 308-317): width = the U-Net's cross-attention width, depth 4, 64-wide
heads, 12 heads, 16 queries, feed-forward ratio 4, input = the encoder's ``hidden_size``.

The released ``ip-adapter-plus`` files keep the ``Resampler``'s own names (``layers.<i>.0.norm1`` / ``norm2`` /
``to_q`` / ``to_kv`` / ``to_out``, ``layers.<i>.1.0`` / ``1.1`` / ``1.3`` for the feed-forward), which diffusers'
``_convert_ip_adapter_image_proj_to_diffusers`` renames (its "IP-Adapter Plus" branch: ``to_kv`` split into
``to_k`` / ``to_v``, the heads read as ``to_q`` rows / 64, the queries from ``latents``). :func:`released_tensors`
writes that layout from the diffusers module and :func:`load_released` reads it back.
"""

from __future__ import annotations

import torch
from torch import nn

#: diffusers' loader reads the heads as ``to_q`` rows / 64 and renames the layers 0-3 only: both fixed here
DIM_HEAD, DEPTH = 64, 4
#: the official recipe's options (``tutorial_train_plus.py``: ``heads=12``, ``--num_tokens`` default 16)
HEADS, NUM_TOKENS = 12, 16


def build_resampler(image_embed_dim: int, cross_attention_dim: int, width: int, heads: int, num_tokens: int):
    """diffusers' ``IPAdapterPlusImageProjection`` with the official shapes (see the module docstring)."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    return IPAdapterPlusImageProjection(
        embed_dims=image_embed_dim,
        output_dims=cross_attention_dim,
        hidden_dims=width,
        depth=DEPTH,
        dim_head=DIM_HEAD,
        heads=heads,
        num_queries=num_tokens,
        ffn_ratio=4,
    )


def _renamed(depth: int) -> list[tuple[str, str]]:
    """``(Resampler name, diffusers name)`` of every tensor but the fused ``to_kv``."""
    pairs = [(name, name) for name in ("latents", "proj_in.weight", "proj_in.bias", "proj_out.weight")]
    pairs += [(name, name) for name in ("proj_out.bias", "norm_out.weight", "norm_out.bias")]
    for layer in (f"layers.{i}" for i in range(depth)):
        for kind in ("weight", "bias"):
            pairs += [(f"{layer}.0.norm1.{kind}", f"{layer}.ln0.{kind}")]
            pairs += [(f"{layer}.0.norm2.{kind}", f"{layer}.ln1.{kind}")]
            pairs += [(f"{layer}.1.0.{kind}", f"{layer}.ff.0.{kind}")]
        pairs += [(f"{layer}.0.to_q.weight", f"{layer}.attn.to_q.weight")]
        pairs += [(f"{layer}.0.to_out.weight", f"{layer}.attn.to_out.0.weight")]
        pairs += [(f"{layer}.1.1.weight", f"{layer}.ff.1.net.0.proj.weight")]
        pairs += [(f"{layer}.1.3.weight", f"{layer}.ff.1.net.2.weight")]
    return pairs


def released_tensors(projection: nn.Module) -> dict[str, torch.Tensor]:
    """The projection's tensors under the ``Resampler``'s names (without the ``image_proj.`` prefix); ``to_kv`` is
    ``to_k`` above ``to_v``, as the official ``to_kv(x).chunk(2, dim=-1)`` splits it."""
    state = projection.state_dict(keep_vars=True)
    tensors = {official: state[ours] for official, ours in _renamed(len(projection.layers))}
    for i, block in enumerate(projection.layers):
        tensors[f"layers.{i}.0.to_kv.weight"] = torch.cat([block.attn.to_k.weight, block.attn.to_v.weight])
    return {key: value.detach() for key, value in tensors.items()}


@torch.no_grad()
def load_released(projection: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copies tensors of :func:`released_tensors`' names and shapes (checked by the caller) into ``projection``."""
    state = projection.state_dict()
    for official, ours in _renamed(len(projection.layers)):
        state[ours].copy_(tensors[official])
    for i, block in enumerate(projection.layers):
        keys, values = tensors[f"layers.{i}.0.to_kv.weight"].chunk(2)
        block.attn.to_k.weight.copy_(keys)
        block.attn.to_v.weight.copy_(values)


def released_options(tensors: dict[str, torch.Tensor]) -> dict[str, int | str] | None:
    """The ``ip_adapter`` options of a released plus file's ``image_proj.*`` tensors and the cross-attention width it
    was trained for, or None when they are not a ``Resampler``'s."""
    latents, proj_in = tensors.get("image_proj.latents"), tensors.get("image_proj.proj_in.weight")
    to_q, proj_out = tensors.get("image_proj.layers.0.0.to_q.weight"), tensors.get("image_proj.proj_out.weight")
    if any(t is None for t in (latents, proj_in, to_q, proj_out)) or latents.ndim != 3:
        return None
    return {
        "variant": "plus",
        "image_embed_dim": int(proj_in.shape[1]),
        "num_tokens": int(latents.shape[1]),
        "resampler_width": int(latents.shape[2]),
        "resampler_heads": int(to_q.shape[0] // DIM_HEAD),
        "cross_attention_dim": int(proj_out.shape[0]),
    }
