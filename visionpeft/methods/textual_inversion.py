"""Textual inversion (Gal et al., ICLR 2023): new placeholder tokens whose embeddings are the only trained tensors.

Follows diffusers' ``examples/textual_inversion/textual_inversion.py`` (and ``textual_inversion_sdxl.py``: on SDXL
every text encoder gets the tokens and rows of its own, lines 664-713 at 58eb52c): the placeholder token plus
``num_vectors - 1`` extra tokens ``<token>_1, <token>_2, ...`` are added to the tokenizer and initialised from the
initializer word's embedding. Instead of resizing the embedding table and restoring the old rows after every
optimizer step, the new rows live in their own parameter appended to the frozen table, so every other row stays
bit-identical by construction.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError, IncompatibleMethodError
from ..schema import setting
from .base import BUNDLE_PREFIX, ExportParts, Method, MethodConfig, register_method


@dataclass
class TextualInversionConfig(MethodConfig):
    """Textual inversion options (diffusers' example: one vector, the initializer a single word).

    Attributes:
        token: The placeholder token used in prompts, e.g. ``<my-cat>``.
        initializer: A word that tokenizes to one token; its embedding initialises every new vector. None: random
            rows, normal times the embedding table's std (diffusers' pivotal-tuning scripts without
            ``--initializer_concept``).
        num_vectors: Embedding vectors for the concept (tokens ``<token>``, ``<token>_1``, ...).
        retract: After every optimizer step, scale the new rows toward the table's std (the pivotal-tuning scripts'
            ``retract_embeddings``).
    """

    tower: str | None = setting("text_encoder", "the pipeline component holding the token embeddings")
    token: str = setting("<concept>", "the placeholder token used in prompts", nonempty=True)
    initializer: str | None = setting(
        "object",
        "a one-token word whose embedding initialises the new vectors; null: random normal rows times the embedding "
        "table's std (diffusers' pivotal-tuning scripts without --initializer_concept)",
        nonempty=True,
    )
    num_vectors: int = setting(1, "embedding vectors for the concept", min=1)
    retract: bool = setting(
        False,
        "after every optimizer step, scale the new rows by (table std / their std) ** 0.1 (diffusers' pivotal-tuning "
        "scripts' retract_embeddings)",
    )


class NewTokenEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` extended by trainable rows for ids ``num_embeddings ..``."""

    _vp_wrapper = True

    def __init__(self, base: nn.Embedding, rows: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.new = nn.Parameter(rows.clone())
        #: The frozen table's std (what random rows are scaled by and :meth:`retract` pulls toward).
        self.table_std = float(base.weight.detach().std())

    @torch.no_grad()
    def retract(self) -> None:
        """Scales the new rows by ``(table std / their std) ** 0.1`` (diffusers' ``retract_embeddings``)."""
        self.new.mul_((self.table_std / self.new.std()) ** 0.1)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight, self.new.to(self.base.weight.dtype)])

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.new.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Look the frozen table and the new rows up separately: concatenating them would copy the whole table
        # (49,408 x 768 for SD 1.5) every step and give it a table-sized gradient; the values are the same.
        count = self.base.num_embeddings
        is_new = (ids >= count).unsqueeze(-1)
        old = self.base(ids.clamp(max=count - 1))
        new = F.embedding((ids - count).clamp(min=0), self.new.to(old.dtype))
        return torch.where(is_new, new, old)


@register_method
class TextualInversion(Method):
    name = "textual_inversion"
    config_class = TextualInversionConfig
    requires = {"new_tokens": "a Stable Diffusion pipeline's tokenizer and text encoder (attach it to the pipeline)"}
    provides = frozenset({"after_optimizer_step"})
    export_formats = frozenset({"diffusers", "kohya"})
    task_inputs = ("token",)

    def placeholder_tokens(self) -> list[str]:
        token = self.config.token
        return [token] + [f"{token}_{i}" for i in range(1, self.config.num_vectors)]

    def prompt_towers(self) -> list[str]:
        """The text towers that read the prompts, each through its own tokenizer: one new embedding each (SDXL's
        two encoders, as diffusers' ``textual_inversion_sdxl.py``)."""
        return self.backbone.text_encoders()

    def build(self) -> None:
        cfg, backbone = self.config, self.backbone
        tokens = self.placeholder_tokens()
        towers = self.prompt_towers()
        for tower in towers:  # every check before anything changes
            tokenizer = backbone.tokenizer_of(tower)
            if cfg.initializer is not None and len(tokenizer.encode(cfg.initializer, add_special_tokens=False)) != 1:
                raise ConfigError(f"textual_inversion.initializer '{cfg.initializer}' must be a single token")
            taken = [t for t in tokens if t in tokenizer.get_vocab()]
            if taken:
                where = f"{tower}'s tokenizer" if len(towers) > 1 else "the tokenizer's vocabulary"
                raise ConfigError(f"textual_inversion token {taken[0]} is already in {where}")
        self._tokenizers = {}
        for tower in towers:
            self._grow(tower, tokens)

    def _grow(self, tower: str, tokens: list[str]) -> None:
        """Adds the tokens to ``tower``'s tokenizer and their rows, initialised as the initializer word (or drawn
        at random: :func:`random_rows`), to its embedding table."""
        backbone = self.backbone
        tokenizer = backbone.tokenizer_of(tower)
        parent, attr = backbone.token_embedding_slot(tower)
        embedding = getattr(parent, attr)
        grown = copy.deepcopy(tokenizer)
        grown.add_tokens(tokens)
        ids = grown.convert_tokens_to_ids(tokens)
        if ids != list(range(embedding.num_embeddings, embedding.num_embeddings + len(tokens))):
            raise IncompatibleMethodError(
                f"the {tower} tokenizer ({len(tokenizer)} tokens) and its embedding table "
                f"({embedding.num_embeddings} rows) disagree; cannot place new tokens"
            )
        self._tokenizers[tower] = tokenizer
        backbone.replace_tokenizer(grown, tower)
        if self.config.initializer is None:
            rows = random_rows(embedding.weight.detach(), len(tokens))
        else:
            init_id = tokenizer.encode(self.config.initializer, add_special_tokens=False)[0]
            rows = embedding.weight[init_id].detach().float().repeat(len(tokens), 1).to(embedding.weight.dtype)
        wrapper = NewTokenEmbedding(embedding, rows)
        self.wrap(parent, attr, wrapper, lambda pname: f"{tower}.textual_inversion.{pname}")

    def after_optimizer_step(self) -> None:
        """``retract``: pulls every tower's new rows toward its table's std (the training loop calls this after
        each optimizer step, whether or not ``optim.train_fraction`` has stopped the rows, as the script does)."""
        if self.config.retract:
            for parent, attr, _ in self._wrapped:
                getattr(parent, attr).retract()

    def detach(self) -> None:
        for tower, tokenizer in (getattr(self, "_tokenizers", None) or {}).items():
            self.backbone.replace_tokenizer(tokenizer, tower)
        self._tokenizers = {}
        super().detach()

    def forget(self) -> None:  # pragma: no cover - never merged: new tokens are not a weight update
        raise RuntimeError("textual inversion cannot be merged")

    def learned_embeds(self) -> dict[str, torch.Tensor]:
        """The file ``pipeline.load_textual_inversion`` reads: ``{token: (num_vectors, dim)}`` for one text encoder;
        for SDXL's two, the ``{"clip_l": ..., "clip_g": ...}`` file of A1111 / ComfyUI, whose tensors diffusers loads
        one encoder at a time (``load_textual_inversion(state["clip_g"], token=..., text_encoder=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer_2)``)."""
        rows = [getattr(parent, attr).new.detach().to("cpu", torch.float32) for parent, attr, _ in self._wrapped]
        if len(rows) == 1:
            return {self.config.token: rows[0]}
        return dict(zip(SDXL_EMBEDDING_KEYS, rows, strict=True))

    def export_parts(self, format: str) -> ExportParts:
        """diffusers: ``learned_embeds.safetensors``. kohya: the embeddings bundled in the LoRA file as A1111 reads
        them (``extensions-builtin/Lora/networks.py``, ``load_network``; the embedding named by the
        key is used under that word in prompts): ``bundle_emb.<token>.string_to_param.*`` holding the
        ``(num_vectors, dim)`` rows of a single text encoder (A1111's ``.pt`` embedding layout), or
        ``bundle_emb.<token>.clip_l`` / ``.clip_g`` for SDXL (the layout of its SDXL embeddings files).

        Raises:
            CheckpointError: kohya, for a token holding a dot (A1111 splits the key at dots).
        """
        embeds = self.learned_embeds()
        if format != "kohya":
            return ExportParts(files={"learned_embeds.safetensors": embeds})
        token = self.config.token
        if "." in token:
            raise CheckpointError(
                f"textual_inversion token {token!r} holds a dot, which A1111 reads as a key separator in a kohya "
                "bundle; use a token without dots, or format='diffusers'"
            )
        if set(embeds) == set(SDXL_EMBEDDING_KEYS):
            return ExportParts(bundled={f"{BUNDLE_PREFIX}{token}.{key}": rows for key, rows in embeds.items()})
        return ExportParts(bundled={f"{BUNDLE_PREFIX}{token}.string_to_param.*": embeds[token]})


def random_rows(table: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` new rows drawn as diffusers' pivotal-tuning scripts draw them: standard normal (torch's global
    generator, float32) in the table's dtype, times the table's std."""
    return torch.randn(count, table.shape[1]).to(table.device, table.dtype) * table.std()


#: The keys of an SDXL embeddings file, encoder 1 (CLIP ViT-L) then encoder 2 (OpenCLIP ViT-bigG).
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")
