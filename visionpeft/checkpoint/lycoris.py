"""LyCORIS's single-file layout, the kohya ``.safetensors`` files A1111, ComfyUI and sd-scripts read: LoHa, LoKr,
LoCon (LoRA, convolutions included) and OFT modules of a Stable Diffusion U-Net and CLIP text encoder.

Each adapted module is a group of tensors named by the module's path in the diffusers U-Net (``lora_unet_``) or the
text encoder (``lora_te_``, its path under ``text_model.`` as in transformers 4 and sd-scripts), dots turned into
underscores (``lora_unet_down_blocks_0_resnets_0_conv1``), followed by the LyCORIS tensor name:

- LoHa: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in x kh x kw), ``hada_w2_a``, ``hada_w2_b``; a CP-factored
  convolution (LyCORIS ``use_tucker``, PEFT ``use_effective_conv2d``) has ``hada_t1`` / ``hada_t2`` (r, r, kh, kw)
  with ``hada_w*_a`` (r, out) and ``hada_w*_b`` (r, in).
- LoKr: ``lokr_w1`` (a, c) or ``lokr_w1_a`` / ``lokr_w1_b``, and ``lokr_w2`` (b, d[, kh, kw]) or ``lokr_w2_a`` /
  ``lokr_w2_b`` (CP: with ``lokr_t2``); delta W = kron(w1, w2).
- LoCon: ``lora_down.weight`` (r, in[, kh, kw]), ``lora_up.weight`` (out, r[, 1, 1]); CP: ``lora_down`` 1 x 1,
  ``lora_mid.weight`` (r, r, kh, kw).
- OFT (LyCORIS ``diag-oft``): ``oft_blocks`` (blocks, b, b), any B whose Q = B - B^T is the skew matrix of a block;
  the layer's output rows turned block by block, ``W' = R^T W`` with ``R = (I + Q)(I - Q)^-1`` (visionpeft's ``oft``
  with ``output_side=True`` and the exact Cayley transform); ``alpha`` is a constraint there, not a scale: Q is
  scaled down to norm ``alpha x out`` when larger (0: off); ``rescale`` (out, 1, ...) is a scale per output row.
- ``alpha``: the update is scaled by ``alpha / rank``, the rank read off the factors (``hada_w1_b``'s rows, those of
  ``lokr_w1_b`` or ``lokr_w2_b``, ``lora_down``'s); a LoKr with both factors dense has no rank and scale 1, as has a
  module without alpha (or alpha 0: LyCORIS then takes the rank).

Where these keys are read: lycoris-lora (``lycoris/modules/loha.py``, ``lokr.py``, ``locon.py``, ``diag_oft.py``:
each module's ``make_module_from_state_dict``; ``lycoris/kohya.py``: ``create_network_from_weights`` matches the names
against the U-Net's and text encoder's ``named_modules()``), AUTOMATIC1111's webui
(``extensions-builtin/Lora/network_hada.py``, ``network_lokr.py``, ``network_lora.py``, ``network_oft.py``;
``network.py``'s ``calc_scale`` is alpha / dim, 1 without either) and ComfyUI (``comfy/weight_adapter/loha.py``,
``lokr.py``, ``lora.py``, ``oft.py``; ``comfy/lora.py`` maps ``lora_unet_`` / ``lora_te_`` names onto the model).
Quirks of lycoris-lora's own loader (A1111 and ComfyUI read these files as they are): it rebuilds a LoKr's Kronecker
split from the factors' shapes with its own ``factorization`` - flattening a conv's kernel into the input size, which
misreads some convolutions (SD's 4-channel ``conv_in`` / ``conv_out``), and putting the smaller factor first, so a
``decompose_factor`` above a size's square root gives a file only A1111 / ComfyUI read -; it takes a CP-factored
LoKr's rank from ``lokr_w2_a``'s second side, which is not the rank there; it rebuilds an OFT's blocks from the block
size, smaller factor first (a block larger than the block count, as 4 on a 4-channel layer, fails); and it names the
text encoder's modules as the model is, which under transformers 5 lacks ``text_model.``.

Not held: visionpeft's default (PEFT's) ``oft``, which turns a layer's *input* side (W' = W R^T), and ``boft``: LyCORIS,
kohya, A1111 and ComfyUI turn the *output* side (LyCORIS's ``boft`` with its own butterfly order too); no file of one
means the other's model. ``oft`` with ``output_side=True`` and ``use_cayley_neumann=False`` is theirs. (IA)^3
(LyCORIS ``ia3``: ``weight`` and ``on_input``) scales the weight by 1 + w, bias untouched, where PEFT's vector is the
scale itself and scales an output's bias too, and lycoris-lora 4.1.3's loader fails on every such file
(``IA3Module.make_module_from_state_dict`` takes one tensor, ``get_module`` gives it two).

:func:`lycoris_state_dict` names the methods' LyCORIS parts as a file does, :func:`kohya_metadata` gives the file the
``ss_*`` metadata sd-scripts writes; :mod:`visionpeft.checkpoint.lycoris_import` reads such files.
"""

from __future__ import annotations

import json
from collections import Counter

import torch

#: The kohya prefix of each Stable Diffusion pipeline component (sd-scripts' and A1111's names for SD 1.x / 2.x).
COMPONENT_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}

#: The LyCORIS tensor names of each algorithm visionpeft reads and writes (after ``<module>.``).
ALGORITHM_NAMES = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "oft": ("oft_blocks",),
}

#: LyCORIS's ``algo`` of each (``ss_network_args``).
LYCORIS_ALGOS = {"loha": "loha", "lokr": "lokr", "lora": "lora", "oft": "diag-oft"}

#: Tensor names of LyCORIS modules visionpeft does not read, and what they are.
OTHER_ALGORITHMS = {
    "rescale": "rescaled OFT (a scale per output row)",
    "on_input": "(IA)^3",
    "a1.weight": "GLoRA",
    "diff": "full (a whole weight difference)",
    "w_norm": "norm (trained norm layers)",
    "dora_scale": "DoRA (weight-decomposed)",
}

#: Names that occur in LyCORIS files only (a plain kohya LoRA file has none of them).
LYCORIS_ONLY = frozenset(
    name for names in ALGORITHM_NAMES.values() for name in names if not name.startswith("lora_")
) | {"lora_mid.weight", *(name for name in OTHER_ALGORITHMS if name != "dora_scale")}


def kohya_module_name(component: str, path: str) -> str:
    """The kohya name of the module at ``path`` in a pipeline ``component`` (``unet`` / ``text_encoder``)."""
    if component == "text_encoder" and not path.startswith("text_model."):
        path = "text_model." + path
    return f"{COMPONENT_PREFIXES[component]}_{path.replace('.', '_')}"


def lycoris_state_dict(adapter_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The methods' LyCORIS parts (``<component>.<module path>.<LyCORIS name>``, see
    :meth:`visionpeft.methods.weight_space.WeightSpaceMethod.export_parts`) under the file's keys."""
    tensors = {}
    for key, tensor in adapter_tensors.items():
        module, _, name = key.rpartition(".")
        component, _, path = module.partition(".")
        tensors[f"{kohya_module_name(component, path)}.{name}"] = tensor.detach().float()
    return tensors


def module_algorithm(names: set[str]) -> str | None:
    """The algorithm of one module's tensor names: ``loha``, ``lokr``, ``lora``, an :data:`OTHER_ALGORITHMS` name,
    or None when the names are none of these."""
    for name in OTHER_ALGORITHMS:
        if name in names:
            return name
    for algorithm, known in ALGORITHM_NAMES.items():
        if names & set(known):
            return algorithm
    return None


def module_rank(algorithm: str, tensors: dict[str, torch.Tensor]) -> int | None:
    """The rank readers divide alpha by (None: a LoKr with both factors dense, scale 1, or an OFT, where alpha is a
    constraint)."""
    if algorithm == "loha":
        return tensors["hada_w1_b"].shape[0]
    if algorithm == "lora":
        return tensors["lora_down.weight"].shape[0]
    factor = tensors.get("lokr_w1_b", tensors.get("lokr_w2_b"))
    return None if factor is None else factor.shape[0]


def group_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A file's tensors by module name (the key up to its first dot)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, name = key.partition(".")
        modules.setdefault(module, {})[name] = tensor
    return modules


def kohya_metadata(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The ``ss_*`` metadata sd-scripts writes for a LyCORIS network (``ss_network_module`` ``lycoris.kohya``,
    ``ss_network_dim`` / ``ss_network_alpha`` - the most common module's - and ``ss_network_args`` with the ``algo``
    most modules use), read by A1111 and the sd-scripts tools; a file of LoRA modules alone keeps the plain format."""
    ranks, algorithms = Counter(), Counter()
    for module in group_modules(tensors).values():
        algorithm = module_algorithm(set(module))
        algorithms[LYCORIS_ALGOS[algorithm]] += 1
        alpha = float(module["alpha"]) if "alpha" in module else None
        if algorithm == "oft":  # LyCORIS's dim of an OFT is its block size
            dim = module["oft_blocks"].shape[-1]
        else:  # a dense LoKr's alpha is its r
            dim = module_rank(algorithm, module) or (int(alpha) if alpha else 1)
        ranks[(dim, alpha if alpha is not None else float(dim))] += 1
    if set(algorithms) <= {"lora"}:
        return {"format": "pt"}
    (dim, alpha), _ = ranks.most_common(1)[0]
    algo = next(name for name, _ in algorithms.most_common() if name != "lora")
    return {
        "format": "pt",
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({"algo": algo}),
    }


def is_lycoris_file(keys: list[str]) -> bool:
    """Whether a kohya-style file holds LyCORIS modules other than plain LoRA ones."""
    return any(key.partition(".")[2] in LYCORIS_ONLY for key in keys)
