"""The kohya / ComfyUI layout of a Flux LoRA: Black Forest Labs' module names, fused projections.

sd-scripts' ``networks/lora_flux.py`` and ComfyUI name the original Flux modules
(``lora_unet_double_blocks_{i}_img_attn_qkv``, ``..._txt_mlp_0``, ``lora_unet_single_blocks_{i}_linear1``, ...),
where diffusers splits the fused ``qkv`` (and a single-stream block's ``linear1`` = q, k, v and the MLP input) into
separate Linears. diffusers reads this layout with ``_convert_kohya_flux_lora_to_diffusers``
(``diffusers/loaders/lora_conversion_utils.py``): a fused module's ``lora_up`` whose off-diagonal blocks are zero is
cut back into the separate LoRAs (its "sparse" case). So the separate LoRAs of one fused module are written as one
LoRA of the summed rank: ``lora_down`` their A stacked, ``lora_up`` their B block-diagonal, a projection the adapter
left out as zero blocks, alpha = that rank (the scale is folded into B). The CLIP-L encoder's LoRAs are
``lora_te1_text_model_...`` (sd-scripts' prefix for CLIP-L).
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError

#: diffusers' module (relative to a double-stream block) -> (kohya module, slot in the fused module or None)
DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0),
    "attn.to_k": ("img_attn_qkv", 1),
    "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", None),
    "ff.net.0.proj": ("img_mlp_0", None),
    "ff.net.2": ("img_mlp_2", None),
    "norm1.linear": ("img_mod_lin", None),
    "attn.add_q_proj": ("txt_attn_qkv", 0),
    "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_add_out": ("txt_attn_proj", None),
    "ff_context.net.0.proj": ("txt_mlp_0", None),
    "ff_context.net.2": ("txt_mlp_2", None),
    "norm1_context.linear": ("txt_mod_lin", None),
}
#: the same for a single-stream block (``linear1`` = q, k, v, MLP input)
SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation_lin", None),
}
#: how many slots each fused module has, and which diffusers modules fill them
FUSED = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}
FUSED["txt_attn_qkv"] = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
FUSED["linear1"] = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def _kohya_name(local: str) -> tuple[str, str, int | None] | None:
    """(kohya module, block-local diffusers path, slot) of a transformer module path, or None."""
    for prefix, kind, table in (
        ("transformer_blocks.", "double", DOUBLE),
        ("single_transformer_blocks.", "single", SINGLE),
    ):
        if local.startswith(prefix):
            index, _, inner = local[len(prefix) :].partition(".")
            if inner in table:
                module, slot = table[inner]
                return f"lora_unet_{kind}_blocks_{index}_{module}", f"{prefix}{index}", slot
    return None


def flux_kohya_state_dict(
    lora_layers: dict[str, tuple[torch.Tensor, torch.Tensor]], shapes: dict[str, tuple[int, int]]
) -> dict[str, torch.Tensor]:
    """The kohya Flux file of ``lora_layers`` (model-relative path -> (A, B), the scale folded into B).

    Args:
        shapes: (out, in) of every Linear a fused module joins (``transformer.<path>`` -> shape), for the zero blocks
            of projections the adapter left out.

    Raises:
        CheckpointError: A module the layout has no name for, in one line.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, tuple[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for path, (a, b) in lora_layers.items():
        group, _, local = path.partition(".")
        if group == "text_encoder":
            inner = local if local.startswith("text_model.") else "text_model." + local
            name = "lora_te1_" + inner.replace(".", "_")
            out.update({f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b})
            out[f"{name}.alpha"] = torch.tensor(float(a.shape[0]))
            continue
        found = _kohya_name(local) if group == "transformer" else None
        if found is None:
            raise CheckpointError(
                f"the kohya Flux layout has no name for {path} (it holds the double / single-stream blocks' "
                "projections, norm modulations and CLIP-L); save with format='diffusers'"
            )
        name, block, slot = found
        if slot is None:
            out.update({f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b})
            out[f"{name}.alpha"] = torch.tensor(float(a.shape[0]))
        else:
            fused.setdefault(name, (f"transformer.{block}", {}))[1][slot] = (a, b)
    for name, (block, slots) in fused.items():
        members = FUSED[next(key for key in FUSED if name.endswith(key))]
        rank = max(a.shape[0] for a, _ in slots.values())
        dtype = next(iter(slots.values()))[0].dtype
        downs, ups = [], []
        for slot, member in enumerate(members):
            rows, columns = shapes[f"{block}.{member}"]
            a, b = slots.get(slot, (torch.zeros(0, columns, dtype=dtype), torch.zeros(rows, 0, dtype=dtype)))
            downs.append(torch.cat([a, a.new_zeros(rank - a.shape[0], columns)]))
            ups.append(torch.cat([b, b.new_zeros(rows, rank - b.shape[1])], dim=1))
        out[f"{name}.lora_down.weight"] = torch.cat(downs)
        out[f"{name}.lora_up.weight"] = torch.block_diag(*ups)
        out[f"{name}.alpha"] = torch.tensor(float(rank * len(members)))
    return out
