"""LyCORIS files in: a kohya-style ``.safetensors`` of LoHa, LoKr, LoCon and OFT modules (the layout of
:mod:`visionpeft.checkpoint.lycoris`; what lycoris-lora, sd-scripts and the A1111 / ComfyUI trainers write, and what
diffusers' ``load_lora_weights`` refuses) attached to a Stable Diffusion pipeline or U-Net as visionpeft's ``loha``,
``lokr``, ``lora`` and ``oft`` (``output_side=True``, exact Cayley) with the file's weights: the model then computes
what lycoris-lora computes with the file.

visionpeft attaches one method of a name per tower, so each (tower, algorithm) of the file becomes one method on the
modules it names (``target_modules``), whatever ranks and alphas the modules have:

- every module's ``alpha / rank`` is folded into its first factor (``hada_w1_a``, ``lokr_w1``, ``lora_up``), and the
  method's ``alpha`` is its ``r`` (scale 1);
- ranks below the method's ``r`` (the file's largest) are padded with zeros, which changes no product;
- LoKr: ``lokr_w1`` is dense (a decomposed one multiplied out, ``decompose_both`` off), one ``decompose_factor`` must
  split every module as the file does (else one line), and ``r`` is large enough that every module the file keeps
  dense is dense here too (a decomposed ``lokr_w2`` that this ``r`` makes dense is multiplied out);
- CP-factored convolutions (``hada_t1``, ``lokr_t2``, ``lora_mid``) keep their CP form where every such convolution of
  the method has it, and are otherwise multiplied out into the plain form (exact: a CP factor of rank r is a rank-r
  product); a LoCon ``lora_mid`` is folded into ``lora_A`` (the 1 x 1 ``lora_down`` then the ``lora_mid`` conv is one
  conv);
- OFT: the block size is the least common multiple of the modules' (smaller blocks sit on the diagonal of larger
  ones: the Cayley transform of a block-diagonal Q is block-diagonal), and LyCORIS's constraint (``alpha``: Q scaled
  to norm ``alpha x out`` when larger) is applied to the file's Q once, as lycoris-lora applies it in every forward.

Everything is checked against the model before anything is attached: a module the model lacks, a factor that does not
fit its layer, an algorithm visionpeft does not read (BOFT, rescaled OFT, (IA)^3, GLoRA, full, norm, DoRA modules)
are one line each, and the model is left as it was.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..adapter import attach, backbone_of, methods_of, unwrap
from ..errors import CheckpointError, VisionPEFTError
from ..layers.loha import LoHaUpdate, cp_weight
from ..layers.lokr import LoKrUpdate, factorization
from ..layers.lora import LoRAUpdate
from ..layers.oft import OFTUpdate
from ..methods.base import base_module_paths
from .lycoris import (
    ALGORITHM_NAMES,
    COMPONENT_PREFIXES,
    OTHER_ALGORITHMS,
    group_modules,
    kohya_module_name,
    module_algorithm,
    module_rank,
)

#: kohya prefixes of the components of SDXL files, which no Stable Diffusion 1.x / 2.x pipeline has.
OTHER_PREFIXES = {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}


@dataclass
class FileModule:
    """One module of a LyCORIS file, located in the model.

    Attributes:
        key: Its name in the file. algorithm: ``loha``, ``lokr``, ``lora`` or ``oft``. tower: The tower holding it.
        path: Its model-relative path. shape: Its layer's weight shape. tensors: Its tensors by LyCORIS name, alpha
        left out. alpha: The file's alpha (None without one). scale: ``alpha / rank`` (1 without a rank or alpha).
    """

    key: str
    algorithm: str
    tower: str
    path: str
    shape: tuple[int, ...]
    tensors: dict[str, torch.Tensor]
    alpha: float | None
    scale: float

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.shape[2:]

    @property
    def spatial(self) -> bool:
        """A convolution larger than 1 x 1 (where CP factors apply)."""
        return math.prod(self.kernel) > 1

    def fail(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.key} ({self.algorithm}, layer {self.path} {tuple(self.shape)}): {problem}")


def import_lycoris(model: Any, file: str | os.PathLike) -> Any:
    """Attaches the LoHa / LoKr / LoCon / OFT modules of a LyCORIS file to a Stable Diffusion pipeline or U-Net, as
    ``loha`` / ``lokr`` / ``lora`` / ``oft`` methods (one per tower and algorithm) holding the file's weights.

    Raises:
        CheckpointError: An unreadable file, keys for modules or components the model lacks, an algorithm visionpeft
            does not read, factors that do not fit their layers, or methods already on those layers; nothing attached.
    """
    path = Path(file)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    located = ModuleLocator(model, path)
    groups: dict[tuple[str, str], list[FileModule]] = {}
    for key, module_tensors in group_modules(tensors).items():
        module = located.module(key, module_tensors)
        groups.setdefault((module.tower, module.algorithm), []).append(module)
    specs, values = [], {}
    for (tower, algorithm), modules in groups.items():
        options, converted = PLANNERS[algorithm](modules)
        specs.append((algorithm, {"tower": tower, **options, "target_modules": sorted(m.path for m in modules)}))
        values.update(converted)
    before = methods_of(model)
    try:
        attach(model, specs)
    except VisionPEFTError as err:
        raise CheckpointError(f"cannot add the methods of {path} to this model: {err}") from None
    with torch.no_grad():
        for method in methods_of(model):
            if method in before:
                continue
            for name, tensor in method.named_tensors():
                tensor.copy_(values[name].to(tensor.dtype))
    return model


class ModuleLocator:
    """Finds the layer each module name of a file means, in the model's components (``unet``, ``text_encoder``)."""

    def __init__(self, model: Any, file: Path) -> None:
        self.backbone, self.root, self.file = backbone_of(model), unwrap(model), file
        self.components: dict[str, tuple[str, str, dict[str, str]]] = {}

    def component(self, component: str, key: str) -> tuple[str, str, dict[str, str]]:
        """(tower, path prefix, kohya module name -> path) of a component."""
        if component not in self.components:
            where = self.backbone.diffusers_component(component)
            if where is None:
                raise CheckpointError(
                    f"{self.file} holds {component} modules ({key}); this {self.backbone.family} model has no "
                    f"{component}"
                )
            tower, prefix = where
            holder = self.root.get_submodule(prefix.rstrip(".")) if prefix else self.root
            names = {}
            for module in base_module_paths(holder).values():
                # the text encoder: under text_model. as sd-scripts names it, or as the model is (lycoris-lora)
                names[f"{COMPONENT_PREFIXES[component]}_{module.replace('.', '_')}"] = module
                names[kohya_module_name(component, module)] = module
            self.components[component] = (tower, prefix, names)
        return self.components[component]

    def module(self, key: str, tensors: dict[str, torch.Tensor]) -> FileModule:
        component = self.component_of(key)
        algorithm = module_algorithm(set(tensors))
        if algorithm == "oft" and tensors["oft_blocks"].dim() != 3:
            algorithm = "boft"
        if algorithm in OTHER_ALGORITHMS or algorithm == "boft":
            what = OTHER_ALGORITHMS.get(algorithm, "BOFT (butterfly oft_blocks)")
            raise CheckpointError(
                f"{self.file}: {key} is a LyCORIS {what} module; visionpeft reads LoHa, LoKr, LoCon (LoRA) and OFT "
                "modules"
            )
        unknown = sorted(set(tensors) - set(ALGORITHM_NAMES.get(algorithm, ())) - {"alpha"})
        if algorithm is None or unknown:
            raise CheckpointError(
                f"{self.file}: {key} holds {', '.join(unknown or sorted(tensors))}, no LyCORIS module"
            )
        tower, prefix, names = self.component(component, key)
        if key not in names:
            raise CheckpointError(f"{self.file}: {key} names no module of this model's {component}")
        layer = self.root.get_submodule(prefix + names[key])
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
            raise CheckpointError(f"{self.file}: {key} is a {type(layer).__name__}, not a Linear or Conv2d layer")
        alpha = float(tensors["alpha"]) if "alpha" in tensors else None
        rank = module_rank(algorithm, tensors)
        scale = 1.0 if not alpha or rank is None else alpha / rank
        values = {name: t.float() for name, t in tensors.items() if name != "alpha"}
        return FileModule(key, algorithm, tower, prefix + names[key], tuple(weight.shape), values, alpha, scale)

    def component_of(self, key: str) -> str:
        for prefix, component in {**OTHER_PREFIXES, **{v: k for k, v in COMPONENT_PREFIXES.items()}}.items():
            if key.startswith(prefix + "_"):
                return component
        raise CheckpointError(f"{self.file}: {key} is no kohya module name (lora_unet_... / lora_te_...)")


def padded(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``tensor`` with zeros after its entries in every dimension, up to ``shape`` (a lower rank as a higher one)."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    grown = tensor.new_zeros(shape)
    grown[tuple(slice(0, size) for size in tensor.shape)] = tensor
    return grown


def check_shape(module: FileModule, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise module.fail(f"{name} is {tuple(tensor.shape)}, the layer needs {tuple(shape)}")


def required(module: FileModule, *names: str) -> list[torch.Tensor]:
    missing = [name for name in names if name not in module.tensors]
    if missing:
        raise module.fail(f"{', '.join(missing)} missing")
    return [module.tensors[name] for name in names]


def fitted(module: FileModule, values: dict[str, torch.Tensor], update: nn.Module) -> dict[str, torch.Tensor]:
    """The module's values under canonical names, each padded to the shape of the method's parameter (``update``
    built on the meta device with the method's options)."""
    expected = dict(update.named_parameters())
    fitted_values = {}
    for name, parameter in expected.items():
        value = values[name]
        if value.dim() != parameter.dim() or any(v > p for v, p in zip(value.shape, parameter.shape)):
            raise module.fail(f"{name} {tuple(value.shape)} does not fit visionpeft's {tuple(parameter.shape)}")
        fitted_values[f"{module.path}.{name}"] = padded(value, parameter.shape)
    return fitted_values


def flattened_cp(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """CP factors (``core`` (r1, r2, kh, kw), ``out_factor`` (r1, out), ``in_factor`` (r2, in)) as one product of rank
    r1: ((out, r1), (r1, in x kh x kw)), whose product is the CP kernel flattened."""
    inner = torch.einsum("ijkl,jc->ickl", core, in_factor)
    return out_factor.t(), inner.reshape(inner.shape[0], -1)


def meta(update_class: type, *args: Any, **kwargs: Any) -> nn.Module:
    """The method's update of a layer, built on the meta device: its parameter names and shapes, nothing allocated."""
    with torch.device("meta"):
        return update_class(*args, **kwargs)


def plan_loha(modules: list[FileModule]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One ``loha``'s options and canonical tensors for the LoHa modules of a tower."""
    forms = [loha_form(module) for module in modules]
    rank = max(factors[index][-1].shape[0] for factors in forms for index in (0, 1))
    both_cp = [all(len(parts) == 3 for parts in factors) for factors in forms]
    cp = any(both_cp) and all(ok for module, ok in zip(modules, both_cp) if module.spatial)
    values: dict[str, torch.Tensor] = {}
    for module, factors in zip(modules, forms):
        update = meta(LoHaUpdate, module.shape, rank, float(rank), use_effective_conv2d=cp)
        plain = {}
        for index, parts in enumerate(factors, start=1):
            if update.effective_conv:  # the file's CP factors as they are (every spatial conv has them)
                plain.update({f"hada_t{index}": parts[0], f"hada_w{index}_a": parts[1], f"hada_w{index}_b": parts[2]})
            else:
                out_factor, in_factor = flattened_cp(*parts) if len(parts) == 3 else parts
                plain.update({f"hada_w{index}_a": out_factor, f"hada_w{index}_b": in_factor})
        plain["hada_w1_a"] = plain["hada_w1_a"] * module.scale
        values.update(fitted(module, plain, update))
    return {"r": rank, "alpha": float(rank), "use_effective_conv2d": cp}, values


def loha_form(module: FileModule) -> list[tuple[torch.Tensor, ...]]:
    """Both Hadamard factors of a LoHa module, checked against its layer: (w_a, w_b), or (t, w_a, w_b) when CP."""
    out, rest = module.shape[0], module.shape[1:]
    factors = []
    for index in (1, 2):
        out_factor, in_factor = required(module, f"hada_w{index}_a", f"hada_w{index}_b")
        core = module.tensors.get(f"hada_t{index}")
        if core is None:
            check_shape(module, f"hada_w{index}_a", out_factor, (out, out_factor.shape[-1]))
            check_shape(module, f"hada_w{index}_b", in_factor, (out_factor.shape[-1], math.prod(rest)))
            factors.append((out_factor, in_factor))
        else:
            check_shape(module, f"hada_w{index}_a", out_factor, (out_factor.shape[0], out))
            check_shape(module, f"hada_w{index}_b", in_factor, (in_factor.shape[0], rest[0]))
            check_shape(module, f"hada_t{index}", core, (out_factor.shape[0], in_factor.shape[0], *module.kernel))
            factors.append((core, out_factor, in_factor))
    return factors


def plan_lokr(modules: list[FileModule]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One ``lokr``'s options and canonical tensors for the LoKr modules of a tower."""
    forms = [lokr_form(module) for module in modules]
    factor = common_split(modules, [sizes for _, _, sizes in forms])
    dense_needs = [math.ceil(max(b, d) / 2) for _, second, (_, b, _, d) in forms if len(second) == 1]
    rank = max([second[-1].shape[0] for _, second, _ in forms if len(second) > 1] + dense_needs + [1])
    cp = any(len(second) == 3 for _, second, _ in forms) and all(
        len(second) == 3 for module, (_, second, _) in zip(modules, forms) if module.spatial and len(second) > 1
    )
    values: dict[str, torch.Tensor] = {}
    for module, (first, second, (_, b, _, d)) in zip(modules, forms):
        update = meta(LoKrUpdate, module.shape, rank, float(rank), use_effective_conv2d=cp, decompose_factor=factor)
        plain = {"lokr_w1": first * module.scale}
        if hasattr(update, "lokr_w2"):
            plain["lokr_w2"] = dense_second(second, (b, d, *module.kernel))
        elif hasattr(update, "lokr_t2"):
            plain.update(zip(("lokr_t2", "lokr_w2_a", "lokr_w2_b"), second))
        else:
            plain.update(zip(("lokr_w2_a", "lokr_w2_b"), flattened_cp(*second) if len(second) == 3 else second))
        values.update(fitted(module, plain, update))
    options = {"r": rank, "alpha": float(rank), "use_effective_conv2d": cp, "decompose_factor": factor}
    return options, values


def lokr_form(module: FileModule) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[int, int, int, int]]:
    """A LoKr module checked against its layer: its first factor dense, its second as the file has it ((w2,),
    (w2_a, w2_b) or (t2, w2_a, w2_b)), and the split sizes (a, b, c, d): out = a b, in = c d."""
    tensors, kernel = module.tensors, module.kernel
    if "lokr_w1" in tensors:
        first = tensors["lokr_w1"]
    else:
        w1_a, w1_b = required(module, "lokr_w1_a", "lokr_w1_b")
        check_shape(module, "lokr_w1_b", w1_b, (w1_a.shape[-1], w1_b.shape[-1]))
        first = w1_a @ w1_b
    if "lokr_w2" in tensors:
        second: tuple[torch.Tensor, ...] = (tensors["lokr_w2"],)
        b, d = second[0].shape[:2]
        check_shape(module, "lokr_w2", second[0], (b, d, *kernel))
    elif "lokr_t2" in tensors:
        core, out_factor, in_factor = required(module, "lokr_t2", "lokr_w2_a", "lokr_w2_b")
        b, d = out_factor.shape[-1], in_factor.shape[-1]
        check_shape(module, "lokr_t2", core, (out_factor.shape[0], in_factor.shape[0], *kernel))
        second = (core, out_factor, in_factor)
    else:
        out_factor, in_factor = required(module, "lokr_w2_a", "lokr_w2_b")
        b, d = out_factor.shape[0], in_factor.shape[-1] // max(1, math.prod(kernel))
        check_shape(module, "lokr_w2_b", in_factor, (out_factor.shape[-1], d * math.prod(kernel)))
        second = (out_factor, in_factor)
    a, c = first.shape
    if a * b != module.shape[0] or c * d != module.shape[1]:
        raise module.fail(
            f"its factors make a ({a * b}, {c * d}) update, the layer is ({module.shape[0]}, {module.shape[1]})"
        )
    return first, second, (a, b, c, d)


def dense_second(second: tuple[torch.Tensor, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """LoKr's second factor multiplied out to ``shape`` (b, d[, kh, kw])."""
    if len(second) == 1:
        return second[0]
    if len(second) == 3:
        return cp_weight(*second)
    return (second[0] @ second[1]).reshape(shape)


def common_split(modules: list[FileModule], sizes: list[tuple[int, int, int, int]]) -> int:
    """The ``decompose_factor`` whose split (:func:`visionpeft.layers.lokr.factorization`) of every module's output
    and input sizes is the file's.

    Raises:
        CheckpointError: No one factor gives every split (visionpeft's lokr has one per tower)."""
    candidates = [-1, *sorted({size for split in sizes for size in split})]
    for factor in candidates:
        if all(
            factorization(m.shape[0], factor) == (a, b) and factorization(m.shape[1], factor) == (c, d)
            for m, (a, b, c, d) in zip(modules, sizes)
        ):
            return factor
    shown = ", ".join(f"{m.key} {a}x{b} / {c}x{d}" for m, (a, b, c, d) in list(zip(modules, sizes))[:2])
    raise CheckpointError(
        f"the LoKr modules of the {modules[0].tower} tower split their sizes ({shown}) in ways no one "
        "decompose_factor of visionpeft's lokr gives"
    )


def plan_lora(modules: list[FileModule]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One ``lora``'s options and canonical tensors for the LoCon (LoRA) modules of a tower."""
    rank = max(required(module, "lora_down.weight")[0].shape[0] for module in modules)
    values: dict[str, torch.Tensor] = {}
    for module in modules:
        down, up = required(module, "lora_down.weight", "lora_up.weight")
        r, out, kernel = down.shape[0], module.shape[0], module.kernel
        check_shape(module, "lora_up.weight", up, (out, r, *[1] * len(kernel)))
        mid = module.tensors.get("lora_mid.weight")
        if mid is None:
            check_shape(module, "lora_down.weight", down, (r, *module.shape[1:]))
        else:  # the 1 x 1 lora_down, then the lora_mid conv: one conv of the layer's geometry
            check_shape(module, "lora_down.weight", down, (r, module.shape[1], 1, 1))
            check_shape(module, "lora_mid.weight", mid, (r, r, *kernel))
            down = torch.einsum("ijkl,jc->ickl", mid, down[:, :, 0, 0])
        update = meta(LoRAUpdate, math.prod(module.shape[1:]), out, rank, float(rank), kernel_size=kernel)
        values.update(fitted(module, {"lora_A": down, "lora_B": up * module.scale}, update))
    return {"r": rank, "alpha": float(rank)}, values


def plan_oft(modules: list[FileModule]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One output-side ``oft`` (exact Cayley)'s options and canonical tensors for the OFT modules of a tower."""
    skews = []
    for module in modules:
        (blocks,) = required(module, "oft_blocks")
        count, size = blocks.shape[0], blocks.shape[-1]
        check_shape(module, "oft_blocks", blocks, (module.shape[0] // size, size, size))
        if count * size != module.shape[0]:
            raise module.fail(f"oft_blocks {tuple(blocks.shape)} turn {count * size} output rows")
        skew = blocks - blocks.transpose(1, 2)
        if module.alpha:  # lycoris-lora's constraint, as its get_r applies it
            limit, norm = module.alpha * module.shape[0], torch.norm(skew) + 1e-8
            skew = skew * (limit / norm) if norm > limit else skew
        skews.append(skew)
    block_size = math.lcm(*(skew.shape[-1] for skew in skews))
    values: dict[str, torch.Tensor] = {}
    for module, skew in zip(modules, skews):
        if module.shape[0] % block_size:
            raise module.fail(
                f"its {skew.shape[-1]}-row blocks and the tower's other OFT blocks need a block size of {block_size}, "
                f"which does not divide its {module.shape[0]} output rows (visionpeft's oft has one per tower)"
            )
        larger = skew.reshape(-1, block_size // skew.shape[-1], *skew.shape[1:])  # small blocks on the diagonal
        whole = torch.stack([torch.block_diag(*group) for group in larger])
        update = meta(OFTUpdate, module.shape[0], block_size, use_cayley_neumann=False, output_side=True)
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        values.update(fitted(module, {"oft_R": whole[:, rows, cols]}, update))
    options = {"r": 0, "oft_block_size": block_size, "use_cayley_neumann": False, "output_side": True}
    return options, values


#: The method reading each algorithm's modules: (options, canonical tensors) of one method for a tower's modules.
PLANNERS = {"loha": plan_loha, "lokr": plan_lokr, "lora": plan_lora, "oft": plan_oft}
