"""NOAH (Zhang, Zhou & Liu 2022, "Neural Prompt Search", arXiv 2206.04673; official code ZhangYuanhan-AI/NOAH):
a supernet holding VPT prompts, a LoRA and an Adapter in every block, each with a per-layer width chosen from a
search space; an evolutionary search on validation accuracy under a parameter budget (:mod:`visionpeft.sweep.noah`)
picks a subnet, which is then trained again from scratch (``mode: subnet``).

What one block ``i`` does with its choices ``(v_i, l_i, a_i)`` (0: the module is off there), following the official
``model/supernet_vision_transformer_timm.py`` (``Attention``, ``Block``) and ``model/module/adapter_super.py``:

- VPT: ``v_i`` prompt tokens replace the prompts the previous block received (inserted at block 0, or where the
  previous block had none); past the VPT depth the last prompts stay in the sequence; all are removed after the last
  block. Dropout on the prompts (after expanding them over the batch, as the official ``drop_prompt``).
- LoRA: ``qkv(x) + B[:, :l] A[:l] dropout(x)`` over the q, k and v rows, no scaling; ``A`` kaiming-uniform
  (a = sqrt 5), ``B`` zero.
- Adapter: on the MLP branch output ``h`` after drop path (``x + adapter(drop_path(mlp(norm2(x))))``):
  ``h + up[:, :a](dropout(QuickGELU(down[:a] h + b_down[:a]))) + b_up``; xavier-uniform weights, N(0, 1e-6) biases,
  so the supernet does not start as the plain model.

Weight sharing: a smaller choice uses the first rows of the prompts, ``A`` and the adapter's down-projection and the
first columns of ``B`` and the up-projection. The search space (``experiments/NOAH/supernet/supernet-B_prompt_VTAB
.yaml``, whose choices the official VTAB subnets ``experiments/NOAH/subnet/VTAB/*.yaml`` use): a module is on in the
first ``depth`` blocks, depth from ``{3, 6, 9, 12}``, and each of those blocks draws its width from ``{1, 5, 10}``
(``supernet_engine_prompt.sample_configs``: the three depths first, then the widths; a new subnet every training
step). Initialisation draws each tensor as the official 100-wide supernet tensor's first rows (``init_width``: the
xavier bounds depend on it; kaiming's and the zeros do not).

Differences from the official code, each with the same outputs or said why:

- The official model also holds a first-layer prompt with a 100-token position embedding (``visual_prompt_token``,
  ``visual_prompt_token_pos_embed``) that block 0 always replaces before any attention: dead parameters, not built
  here. The official parameter count (``get_sampled_params_numel``, which the search's limit reads) includes them:
  ``76,800 + 768 v_0`` more on ViT-B/16 than the exact count used here (:func:`subnet_parameters`).
- Prompts sit after the class token (this library's place for prompts, where ``vpt`` puts them), not at the end of
  the sequence: attention is permutation-equivariant and the class token is read out, so the outputs are equal.
- A supernet in eval mode runs its largest subnet (or the one :meth:`NOAH.fix_subnet` set), where the official
  evaluation draws one random subnet per validation pass.
- The sampling draws from torch's generator (seeded by the run, saved in its resumable state), where the official
  code re-seeds Python's ``random`` with the epoch number; with gradient accumulation each micro-batch draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, IncompatibleMethodError
from ..layers.adapters import QuickGELU
from ..layers.lora import LoRAUpdate
from ..schema import setting
from .base import Method, MethodConfig, base_module_paths, register_method
from .vpt import PromptTokens

#: the modules of a NOAH block, in the official order of a candidate
MODULES = ("vpt", "lora", "adapter")
#: option name of each module's width choices and of its depth choices
WIDTH_OPTIONS = {"vpt": "vpt_tokens", "lora": "lora_ranks", "adapter": "adapter_dims"}
DEPTH_OPTIONS = {"vpt": "vpt_depths", "lora": "lora_depths", "adapter": "adapter_depths"}
#: a subnet: module -> its width in each block (0: off)
Subnet = dict[str, tuple[int, ...]]


@dataclass
class NOAHConfig(MethodConfig):
    """NOAH options; defaults are the official VTAB-1k space and training script (``supernet_train_prompt.py``:
    ``--drop_rate_LoRA / _prompt / _adapter 0.1``). The largest ViT-B/16 subnet (10 tokens, rank 10, width 10 in all
    12 blocks) trains 12 x (10 x 768 + 10 x (768 + 2,304) + 10 x 1,537 + 768) = 654,456 parameters.

    Attributes:
        mode: ``supernet`` (the largest modules, a random subnet each training step) or ``subnet`` (exactly the
            widths of ``subnet``: the retrain of a found subnet).
        vpt_tokens / lora_ranks / adapter_dims: Widths a block may give each module.
        vpt_depths / lora_depths / adapter_depths: How many first blocks a module may be on in (0: off everywhere).
        subnet: ``mode: subnet``: ``{vpt: [...], lora: [...], adapter: [...]}``, one width per block (0: off).
        vpt_dropout / lora_dropout / adapter_dropout: Dropout on the prompts, the LoRA input, the adapter hidden layer.
        init_width: Width of the official supernet tensors (``SUPERNET.*_DIM = 100``) whose first rows initialise
            each module (at least the largest choice is used).
    """

    mode: str = setting(
        "supernet", "supernet (random subnet per step) or subnet (retrain)", choices=("supernet", "subnet")
    )
    vpt_tokens: tuple[int, ...] = setting((1, 5, 10), "prompt-token counts a block may take", nonempty=True)
    lora_ranks: tuple[int, ...] = setting((1, 5, 10), "LoRA ranks a block may take", nonempty=True)
    adapter_dims: tuple[int, ...] = setting((1, 5, 10), "adapter widths a block may take", nonempty=True)
    vpt_depths: tuple[int, ...] = setting(
        (3, 6, 9, 12), "numbers of first blocks VPT may prompt (0: none)", nonempty=True
    )
    lora_depths: tuple[int, ...] = setting((3, 6, 9, 12), "numbers of first blocks with LoRA (0: none)", nonempty=True)
    adapter_depths: tuple[int, ...] = setting((3, 6, 9, 12), "numbers of first blocks with an adapter", nonempty=True)
    subnet: dict[str, tuple[int, ...]] | None = setting(
        None, "mode subnet: {vpt: [...], lora: [...], adapter: [...]}, one width per block (0: off)"
    )
    vpt_dropout: float = setting(0.1, "dropout on the prompts", min=0, below=1)
    lora_dropout: float = setting(0.1, "dropout on the LoRA input", min=0, below=1)
    adapter_dropout: float = setting(0.1, "dropout on the adapter's hidden layer", min=0, below=1)
    init_width: int = setting(100, "width of the official supernet tensors whose first rows initialise", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        for module in MODULES:
            for option, low in ((WIDTH_OPTIONS[module], 1), (DEPTH_OPTIONS[module], 0)):
                values = getattr(self, option)
                if any(v < low for v in values) or len(set(values)) != len(values):
                    raise ConfigError(
                        f"method 'noah' option '{option}' must list distinct integers of at least {low}, got {values}"
                    )
        if all(getattr(self, DEPTH_OPTIONS[m]) == (0,) for m in MODULES):
            raise ConfigError("method 'noah' has an empty search space: every module's depths are (0,)")
        if self.mode == "subnet" and self.subnet is None:
            raise ConfigError("method 'noah' mode subnet needs subnet: {vpt: [...], lora: [...], adapter: [...]}")
        if self.mode == "supernet" and self.subnet is not None:
            raise ConfigError("method 'noah' option 'subnet' is for mode subnet (the supernet samples its own)")
        if self.subnet is not None:
            self.subnet = check_subnet(self, self.subnet)

    def widths(self, module: str) -> tuple[int, ...]:
        return getattr(self, WIDTH_OPTIONS[module])

    def depths(self, module: str) -> tuple[int, ...]:
        return getattr(self, DEPTH_OPTIONS[module])


def check_subnet(space: NOAHConfig, subnet: Any, layers: int | None = None) -> Subnet:
    """``subnet`` as ``{module: (width per block)}`` once it is a subnet of ``space`` (with ``layers`` blocks when
    given): every width one of the module's choices in its first blocks, 0 after, their number one of its depths.

    Raises:
        ConfigError: One line naming what is wrong.
    """
    if not isinstance(subnet, Mapping) or set(subnet) != set(MODULES):
        raise ConfigError(f"a noah subnet maps vpt, lora and adapter to one width per block, got {subnet!r:.120}")
    found: Subnet = {}
    for module in MODULES:
        values = subnet[module]
        if isinstance(values, str) or not isinstance(values, Sequence) or not all(type(v) is int for v in values):
            raise ConfigError(f"noah subnet {module} must be a list of integers, got {values!r:.80}")
        if layers is not None and len(values) != layers:
            raise ConfigError(f"noah subnet {module} lists {len(values)} blocks; the model has {layers}")
        depth = next((i for i, v in enumerate(values) if v == 0), len(values))
        widths = space.widths(module)
        bad = [v for v in values[:depth] if v not in widths] + [v for v in values[depth:] if v != 0]
        if bad:
            raise ConfigError(
                f"noah subnet {module} {list(values)}: {bad[0]} is not in the space (widths {list(widths)} in the "
                "first blocks, 0 after)"
            )
        if depth not in space.depths(module):
            raise ConfigError(
                f"noah subnet {module} {list(values)} is on in {depth} blocks; the space's depths are "
                f"{list(space.depths(module))}"
            )
        found[module] = tuple(values)
    if len({len(v) for v in found.values()}) != 1:
        raise ConfigError(f"noah subnet lists differ in length: {', '.join(f'{m} {len(v)}' for m, v in found.items())}")
    return found


def sample_subnet(space: NOAHConfig, layers: int, choice: Callable[[Sequence[int]], int]) -> Subnet:
    """A random subnet by the official rule (``sample_configs``): each module's depth, then a width for each of its
    first ``depth`` blocks, every draw uniform over the choices (``choice`` draws one element)."""
    depths = {module: choice(space.depths(module)) for module in MODULES}
    return {m: tuple(choice(space.widths(m)) for _ in range(depths[m])) + (0,) * (layers - depths[m]) for m in MODULES}


def largest_subnet(space: NOAHConfig, layers: int) -> Subnet:
    """Every module at its largest width in its largest number of first blocks."""
    return {m: (max(space.widths(m)),) * max(space.depths(m)) + (0,) * (layers - max(space.depths(m))) for m in MODULES}


@dataclass(frozen=True)
class Geometry:
    """What a subnet's parameter count depends on: ``layers`` blocks of token width ``width``, ``qkv`` rows the LoRA
    updates (q + k + v)."""

    layers: int
    width: int
    qkv: int


def subnet_parameters(subnet: Subnet, geometry: Geometry) -> int:
    """The exact number of parameters a subnet trains (head excluded): per block ``v D`` prompt entries,
    ``l (D + qkv)`` for A and B, ``a (2 D + 1) + D`` for the adapter's weights and biases."""
    d, total = geometry.width, 0
    for v, lora, a in zip(*(subnet[m] for m in MODULES)):
        total += v * d + lora * (d + geometry.qkv) + (a * (2 * d + 1) + d if a else 0)
    return total


class SlicedAdapter(nn.Module):
    """NOAH's adapter (official ``AdapterSuper``): ``up(dropout(QuickGELU(down(h))))`` through the first ``width``
    hidden units, xavier-uniform weights drawn as for an ``init_width``-wide tensor, biases N(0, 1e-6)."""

    def __init__(self, dim: int, width: int, init_width: int, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.up = nn.Linear(width, dim)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        bound = math.sqrt(6.0 / (dim + init_width))  # xavier_uniform_ of the (init_width x dim) official tensor
        with torch.no_grad():
            for layer in (self.down, self.up):
                layer.weight.uniform_(-bound, bound)
                layer.bias.normal_(std=1e-6)

    def delta(self, h: torch.Tensor, width: int) -> torch.Tensor:
        down, up = self.down, self.up
        hidden = self.act(F.linear(h, down.weight[:width].to(h.dtype), down.bias[:width].to(h.dtype)))
        return F.linear(self.dropout(hidden), up.weight[:, :width].to(h.dtype), up.bias.to(h.dtype))


class NOAHLayer(nn.Module):
    """The modules of one block at their stored widths (a module of width 0 is None)."""

    def __init__(self, widths: dict[str, int], geometry: Geometry, config: NOAHConfig) -> None:
        super().__init__()
        d = geometry.width
        init = {m: max(config.init_width, max(config.widths(m))) for m in MODULES}
        bound = math.sqrt(6.0 / (d * (init["vpt"] + 1)))  # xavier_uniform_ of the official (1, init, d) prompts
        self.vpt = PromptTokens(widths["vpt"], d, bound, config.vpt_dropout) if widths["vpt"] else None
        self.lora = LoRAUpdate(d, geometry.qkv, widths["lora"], widths["lora"]) if widths["lora"] else None
        self.lora_dropout = nn.Dropout(config.lora_dropout)
        adapter = widths["adapter"]
        self.adapter = SlicedAdapter(d, adapter, init["adapter"], config.adapter_dropout) if adapter else None


@register_method
class NOAH(Method):
    name = "noah"
    config_class = NOAHConfig
    requires = {"tokens": "a ViT-style token sequence (prompts, qkv, an MLP branch)"}

    # -- the tower ---------------------------------------------------------------------------------------------
    def check_fits(self) -> None:
        super().check_fits()
        cfg, blocks = self.config, self.blocks()
        if not blocks:
            raise IncompatibleMethodError(f"noah needs transformer blocks; the {self.backbone.family} model has none")
        if cfg.subnet is not None:
            check_subnet(cfg, cfg.subnet, len(blocks))
        for module in MODULES if cfg.mode == "supernet" else ():
            deepest = max(cfg.depths(module))
            if deepest > len(blocks):
                raise ConfigError(
                    f"method 'noah' option '{DEPTH_OPTIONS[module]}' goes to {deepest} blocks; the "
                    f"{self.backbone.family} tower has {len(blocks)} (set {DEPTH_OPTIONS[module]} within it)"
                )
        widest = self.stored_subnet()
        for block, lora, adapter in zip(blocks, widest["lora"], widest["adapter"]):
            if adapter and "mlp" not in block.branches:
                raise IncompatibleMethodError(f"noah's adapter needs an MLP branch; {block.name} has none")
            if lora:
                self.qkv_projections(block)

    def qkv_projections(self, block) -> list:
        """The block's q, k and v projections (Linear layers or rows of a fused one) the LoRA updates."""
        paths = base_module_paths(self.backbone.model)
        found = []
        for slot in ("q", "k", "v"):
            proj = block.projections.get(f"attn.{slot}")
            if proj is None or proj.kind not in ("linear", "fused"):
                kind = "missing" if proj is None else f"a {proj.kind}"
                raise IncompatibleMethodError(
                    f"noah's LoRA needs attn.q, attn.k and attn.v as nn.Linear layers; {block.name}'s attn.{slot} "
                    f"is {kind} (nn.MultiheadAttention is not supported)"
                )
            path = paths.get(id(proj.base_layer()), "")
            if self.backbone.export_problem(path, "visionpeft"):  # the backbone reads the weight, never the module
                raise IncompatibleMethodError(
                    f"noah's LoRA cannot add to {path}: the {self.backbone.family} model reads its weight without "
                    "calling the module (EVA's qkv with separate q/v biases)"
                )
            found.append(proj)
        return found

    def geometry(self) -> Geometry:
        blocks = self.blocks()
        rows = 0
        if "attn.q" in blocks[0].projections:
            rows = sum(p.weight_and_bias()[0].shape[0] for p in (blocks[0].projections[f"attn.{s}"] for s in "qkv"))
        return Geometry(len(blocks), self.tower.tokens.dim, rows)

    def stored_subnet(self) -> Subnet:
        """The widths the modules are built with: the subnet's (mode subnet) or the largest (mode supernet)."""
        if self.config.mode == "subnet":
            return dict(self.config.subnet)
        return largest_subnet(self.config, len(self.blocks()))

    # -- building ----------------------------------------------------------------------------------------------
    def build(self) -> None:
        cfg, layout, geometry = self.config, self.tower.tokens, self.geometry()
        stored = self.stored_subnet()
        self.offset = layout.total_prefix  # prompts go after the prefix and the prompts attached before
        self.present = 0  # NOAH prompts in the sequence now
        self.fixed: Subnet | None = dict(cfg.subnet) if cfg.subnet is not None else None
        self.active: Subnet = self.fixed or stored
        self.layers: list[NOAHLayer | None] = []
        for index, block in enumerate(self.blocks()):
            widths = {m: stored[m][index] for m in MODULES}
            if not any(widths.values()):
                self.layers.append(None)
                continue
            layer = self.add_module(block.module, f"{block.name}.noah", NOAHLayer(widths, geometry, cfg))
            self.layers.append(layer)
            if widths["lora"]:
                self._hook_lora(index, block)
            if widths["adapter"]:
                branch = block.branches["mlp"]
                self.hook_tokens_output(branch.residual or branch.module, self._adapt, index)
        first, last = self.blocks()[0].module, self.blocks()[-1].module
        self.hook_tokens_input(first, self._start)
        for index, block in enumerate(self.blocks()):
            if stored["vpt"][index]:
                self.hook_tokens_input(block.module, self._prompt, index)
        self.hook_tokens_output(last, self._strip)

    def _hook_lora(self, index: int, block) -> None:
        """A forward hook per Linear adding its rows of ``B A x`` (B's rows in q, k, v order)."""
        layers: dict[int, tuple[nn.Module, list]] = {}
        start = 0
        for proj in self.qkv_projections(block):
            layer = proj.base_layer()
            rows = proj.rows or (0, layer.out_features)
            width = rows[1] - rows[0]
            layers.setdefault(id(layer), (layer, []))[1].append((rows, (start, start + width)))
            start += width
        for layer, slices in layers.values():
            self.hook_output(layer, self._lora, index, sorted(slices))

    # -- the subnet --------------------------------------------------------------------------------------------
    def fix_subnet(self, subnet: Mapping[str, Sequence[int]] | None) -> None:
        """Runs ``subnet`` (a subnet of the space, on the stored weights) from now on, in training and evaluation;
        None: back to sampling (training) and the largest subnet (evaluation). Supernet mode only."""
        if self.config.mode != "supernet":
            raise ConfigError("noah in mode subnet runs its own subnet; fix_subnet is for a supernet")
        self.fixed = None if subnet is None else check_subnet(self.config, subnet, len(self.blocks()))
        self.active = self.fixed or self.stored_subnet()

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        """Block 0's input: a new forward pass (forget the prompts of one that stopped early, ``vp.features``), and in
        supernet training a new random subnet."""
        self._set_present(0)
        training = any(layer.training for layer in self.layers if layer is not None)
        if self.fixed is None and self.config.mode == "supernet":
            if training:
                self.active = sample_subnet(self.config, len(self.blocks()), _torch_choice)
            else:
                self.active = self.stored_subnet()
        return x

    def _set_present(self, count: int) -> None:
        """Keeps the layout's prompt count (Convpass, EVA's rotary embedding and features read it) equal to the
        prompts in the sequence."""
        self.tower.tokens.extra_prefix += count - self.present
        self.present = count

    # -- forward hooks -----------------------------------------------------------------------------------------
    def _prompt(self, index: int, x: torch.Tensor) -> torch.Tensor:
        count = self.active["vpt"][index]
        if count == 0:  # past the VPT depth: the last prompts go on
            return x
        prompts = self.layers[index].vpt
        tokens = prompts.prompt[:count].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, : self.offset], prompts.dropout(tokens), x[:, self.offset + self.present :]], dim=1)
        self._set_present(count)
        return x

    def _strip(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if self.present:
            output = torch.cat([output[:, : self.offset], output[:, self.offset + self.present :]], dim=1)
            self._set_present(0)
        return output

    def _lora(self, index: int, slices: list, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        rank = self.active["lora"][index]
        if rank == 0:
            return output
        noah = self.layers[index]
        low = F.linear(noah.lora_dropout(inputs[0]), noah.lora.lora_A[:rank].to(output.dtype))
        b = noah.lora.lora_B[:, :rank].to(output.dtype)
        if all(rows == b_rows for rows, b_rows in slices) and slices[-1][0][1] == output.shape[-1]:
            return output + F.linear(low, b[: output.shape[-1]])  # fused qkv (or q alone): B's rows are the layer's
        parts, end = [], 0
        for (start, stop), (b_start, b_stop) in slices:
            if start > end:
                parts.append(output.new_zeros(*output.shape[:-1], start - end))
            parts.append(F.linear(low, b[b_start:b_stop]))
            end = stop
        if end < output.shape[-1]:
            parts.append(output.new_zeros(*output.shape[:-1], output.shape[-1] - end))
        return output + (torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])

    def _adapt(self, index: int, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        width = self.active["adapter"][index]
        return output if width == 0 else output + self.layers[index].adapter.delta(output, width)

    def detach(self) -> None:
        if self.tensors:
            self._set_present(0)
        super().detach()


def _torch_choice(values: Sequence[int]) -> int:
    """One element of ``values``, uniformly, from torch's generator (seeded and saved by the run)."""
    return values[int(torch.randint(len(values), ()))]
