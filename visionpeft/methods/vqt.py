"""Visual Query Tuning (Tu et al., CVPR 2023, "Visual Query Tuning: Towards Effective Usage of Intermediate
Representations for Parameter and Memory Efficient Transfer Learning"; official code andytu28/VQT
``src/models/vit_backbones/h2t_vit.py`` at commit 9bca87e).

Every block gets ``num_tokens`` learnable query tokens of its own, appended to its input. The queries attend to the
block's other tokens but are no keys or values of the attention, so they see neither themselves nor each other and
the other tokens never see them: the frozen model's own tokens compute exactly what they compute without VQT
(``Head2ToeAttention.forward``: keys and values from ``hidden_states[:, query_prompt_len:]``). A query's output
after the block is collected and dropped, and the next block gets fresh queries. The head reads the concatenation
``[n(cls); n(q_1); ...; n(q_L)]`` of the class-token feature (after the final norm) and each block's query outputs
(flattened over its queries), ``n`` an L2 normalisation (``Head2ToeVisionTransformer.forward``, concat mode with
``NORMALIZE_FEATS``).

A linear head on a concatenation is the sum of linear maps on its parts, ``W [a; b] + c = W_a a + c + W_b b``, so
the task's own linear head keeps reading the class-token feature (L2-normalised on its way in) and VQT adds its own
trainable map ``W_b`` from the collected query outputs to the logits: ``W_a`` and the bias are the task head's, ``W_b``
the method's (``blocks.*`` hold the queries, ``vqt.head.weight`` the map). Inside a block the queries sit right before
the patch tokens (the official code puts them first; without positions inside a block the place does not matter)
and count as prefix tokens, so methods that read the patch grid inside blocks (Convpass) and EVA's rotary embedding
leave them alone; outside the blocks nobody sees them.

PETL_Vision (``model/vision_transformer.py`` lines 228-238 and 261-266, ``model/vqt.py``) differs: after dropping the
queries it collects ``x[:, :vqt_num]`` of what remains (the class token and the first patches, not the query
outputs), and it combines the features by a learned weighted sum (``combine_layer``, ones in ``model/vqt.py`` but
re-initialised by its global Linear init) instead of concatenating them; its attention hides the queries as the
official one does (``model/attention.py`` lines 66-68). Here the official repository's mechanism is followed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IncompatibleMethodError
from ..schema import setting
from .base import Method, MethodConfig, register_method
from .vpt import PromptTokens


@dataclass
class VQTConfig(MethodConfig):
    """VQT options; defaults are the official code's runs (``scripts/VQT/run_vqt_vtab.sh``: ``MODEL.H2T.DROPOUT
    0.1``; the README: the query length "can be simply set to 1", as ``run_demo_exp.sh`` does for 12 of the 19
    VTAB-1k tasks, 10 or 20 for the others; ``src/configs/config.py``: ``NORMALIZE_FEATS = True``).

    ViT-B/16 with one query per block trains 12 x 1 x 768 = 9,216 query parameters, plus the query part of the
    classifier, 12 x 1 x 768 x C weights for C classes (the official head is one Linear over (768 + 9,216) features).

    Attributes:
        num_tokens: Query tokens per block.
        dropout: Dropout on the query embeddings (per sample, as the official code applies it after expanding).
        normalize: L2-normalise the class-token feature and each block's query outputs before the head.
    """

    num_tokens: int = setting(1, "query tokens per block", min=1)
    dropout: float = setting(0.1, "dropout on the query embeddings", min=0, below=1)
    normalize: bool = setting(True, "L2-normalise the class-token feature and each block's query outputs")


class QueryTokens(PromptTokens):
    """One block's query tokens, xavier-uniform initialised as VPT's prompts (the official bound); dropout applies
    to the expanded batch, so each sample gets its own mask (``Head2ToeEncoder.forward``)."""

    def expand(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.prompt.to(like.dtype).unsqueeze(0).expand(batch, -1, -1))


@register_method
class VQT(Method):
    name = "vqt"
    config_class = VQTConfig
    frozen_eval = True  # Head2ToeEncoder.train keeps every frozen module in eval mode, the query dropout trains
    requires = {"tokens": "a ViT-style token sequence with a patch grid"}

    def check_fits(self) -> None:
        super().check_fits()
        heads = self.backbone.heads()
        if len(heads) != 1 or not isinstance(next(iter(heads.values())), nn.Linear):
            found = ", ".join(f"{n}: {type(h).__name__}" for n, h in heads.items()) or "none"
            raise IncompatibleMethodError(
                f"vqt feeds its query outputs to one linear classification head; the model's heads are: {found}"
            )
        for block in self.blocks():
            if "attn" not in block.branches:
                raise IncompatibleMethodError(f"vqt needs an attention branch in every block; {block.name} has none")

    def build(self) -> None:
        cfg, layout = self.config, self.tower.tokens
        bound = math.sqrt(6.0 / (layout.in_chans * layout.patch_size**2 + layout.dim))  # the official init
        self._outputs: list[torch.Tensor] = []  # query outputs of the current forward pass, block by block
        self._inside = False  # the queries are in the sequence (counted in the layout's prefix tokens)
        self._mask_cache: tuple | None = None
        for i, block in enumerate(self.blocks()):
            queries = self.add_module(
                block.module, f"{block.name}.vqt", QueryTokens(cfg.num_tokens, layout.dim, bound, cfg.dropout)
            )
            self.hook_tokens_input(block.module, self._insert, queries, i == 0)
            self.hook_input(block.branches["attn"].module, self._hide_queries, with_kwargs=True)
            self.hook_tokens_output(block.module, self._collect)
        head = next(iter(self.backbone.heads().values()))
        width = len(self.blocks()) * cfg.num_tokens * layout.dim
        query_head = nn.Linear(width, head.out_features, bias=False)
        nn.init.kaiming_normal_(query_head.weight, a=0, mode="fan_out")  # the official head init (src/models/mlp.py)
        self.query_head = self.add_module(self.backbone.model, f"{self.tower.prefix}vqt.head", query_head)
        if cfg.normalize:
            self.hook_input(head, self._normalize_feature)
        self.hook_output(head, self._add_query_logits)

    def detach(self) -> None:
        if self.tensors and self._inside:  # a forward pass stopped inside a block
            self.tower.tokens.extra_prefix -= self.config.num_tokens
        self._inside, self._outputs = False, []
        super().detach()

    # -- inside the blocks -------------------------------------------------------------------------------------
    def _patches(self) -> int:
        """Patch tokens of the current input: always the last ones of the sequence."""
        layout = self.tower.tokens
        h, w = layout.input_grid or layout.grid
        return h * w

    def _insert(self, queries: QueryTokens, first: bool, x: torch.Tensor) -> torch.Tensor:
        if first:
            self._outputs = []
        if not self._inside:
            self.tower.tokens.extra_prefix += self.config.num_tokens
            self._inside = True
        at = x.shape[1] - self._patches()
        return torch.cat([x[:, :at], queries.expand(x.shape[0], x), x[:, at:]], dim=1)

    def _hide_queries(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Makes the queries no keys of the attention: an additive mask of -inf over their columns, for every row
        (``Head2ToeAttention``: keys and values come from the other tokens only)."""
        if kwargs.get("attn_mask") is not None:
            raise IncompatibleMethodError("vqt cannot combine its query mask with an attention mask the tower passes")
        x = args[0]
        n = x.shape[0] if self._sequence_first() else x.shape[1]
        kind = x.device.type  # under autocast the scores come in the autocast dtype, which fused kernels ask of a mask
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        key = (n, dtype, x.device)
        if self._mask_cache is None or self._mask_cache[0] != key:
            end = n - self._patches()
            mask = torch.zeros(n, n, dtype=dtype, device=x.device)
            mask[:, end - self.config.num_tokens : end] = float("-inf")
            self._mask_cache = (key, mask)
        return args, {**kwargs, "attn_mask": self._mask_cache[1]}

    def _collect(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        end = output.shape[1] - self._patches()
        start = end - self.config.num_tokens
        self._outputs.append(output[:, start:end])
        if self._inside:
            self.tower.tokens.extra_prefix -= self.config.num_tokens
            self._inside = False
        return torch.cat([output[:, :start], output[:, end:]], dim=1)

    # -- at the head ---------------------------------------------------------------------------------------------
    @staticmethod
    def _normalize_feature(module: nn.Module, args: tuple) -> tuple:
        return (F.normalize(args[0], dim=-1), *args[1:])

    def _add_query_logits(self, module: nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
        outputs, self._outputs = self._outputs, []
        if len(outputs) != len(self.blocks()):
            raise RuntimeError(
                f"vqt's head reads the query outputs of all {len(self.blocks())} blocks of the same forward pass; "
                f"{len(outputs)} were collected (run the whole model, not its head alone)"
            )
        features = [q.reshape(q.shape[0], -1) for q in outputs]
        if self.config.normalize:
            features = [F.normalize(f, dim=-1) for f in features]
        weight = self.query_head.weight
        return logits + self.query_head(torch.cat(features, dim=1).to(weight.dtype)).to(logits.dtype)
