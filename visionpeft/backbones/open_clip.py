"""open_clip CLIP models: the vision tower (open_clip's own transformer or a timm trunk) and the text tower.

The text tower offers ``text_prompts``: tokenization with the CLIP vocabulary shipped in open_clip, token embeddings
and the tower run from embeddings, so methods can learn prompt context (CoOp, CoCoOp). As open_clip's entry in the
library table, the module also builds CLIP models from an architecture name and a pretrained tag or a local file and
says how they read images (``preprocess_cfg``: CLIP's statistics, a center crop of the resized image).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError, did_you_mean
from . import timm_models
from .base import Backbone, Block, Branch, Projection, TokenLayout, Tower
from .hub import offline_unless_reachable
from .libraries import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from .timm_vit import to_2tuple, vit_tower


def clip_tokenize(texts: list[str], context_length: int, clip: nn.Module | None = None) -> torch.Tensor:
    """Token ids of ``texts``: with the tokenizer the model was created with (``open_clip.get_tokenizer(name)``,
    recorded by visionpeft's model factory: SigLIP and others do not use CLIP's BPE), else CLIP BPE with the
    vocabulary shipped in open_clip (works offline)."""
    tokenizer = getattr(clip, "_visionpeft_tokenizer", None) if clip is not None else None
    if tokenizer is not None:
        return tokenizer(texts, context_length=context_length)
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)(texts)


def _residual_blocks(transformer: nn.Module, prefix: str) -> list[Block]:
    blocks = []
    for i, blk in enumerate(transformer.resblocks):
        attn = blk.attn
        if isinstance(attn, nn.MultiheadAttention):
            projections = {f"attn.{s}": Projection("mha", blk, "attn", slot=s) for s in "qkvo"}
        elif hasattr(attn, "in_proj_weight"):
            raise TypeError("open_clip CustomResidualAttentionBlock attention is not supported")
        else:
            raise TypeError(f"unsupported open_clip block layout: {type(blk).__name__}")
        projections["mlp.fc1"] = Projection("linear", blk.mlp, "c_fc")
        projections["mlp.fc2"] = Projection("linear", blk.mlp, "c_proj")
        branches = {
            "attn": Branch(attn, projections["attn.o"], blk.ln_1, residual=getattr(blk, "ls_1", None)),
            "mlp": Branch(blk.mlp, projections["mlp.fc2"], blk.ln_2, residual=getattr(blk, "ls_2", None)),
        }
        blocks.append(Block(f"{prefix}blocks.{i}", blk, branches, projections))
    return blocks


def _prefixed(*prefixes: str):
    return lambda name: any(name == p or name.startswith(p + ".") for p in prefixes)


class OpenCLIP(Backbone):
    """Adapter for ``open_clip.CLIP`` and ``open_clip.CustomTextCLIP``."""

    family = "open_clip"
    default_tower = "vision"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.clip = clip = model
        visual = clip.visual
        if hasattr(visual, "trunk"):  # open_clip.TimmModel wraps a timm model
            if not hasattr(visual.trunk, "blocks"):
                raise TypeError(f"unsupported timm trunk in open_clip: {type(visual.trunk).__name__}")
            self.towers["vision"] = vit_tower(visual.trunk, owns=_prefixed("visual"), forward=visual)
        elif hasattr(visual, "transformer"):
            transformer = visual.transformer
            tokens = TokenLayout(
                dim=transformer.width,
                num_prefix=1,
                grid=to_2tuple(visual.grid_size),
                patch_size=to_2tuple(visual.patch_size)[0],
                in_chans=visual.conv1.in_channels,
                batch_first=getattr(transformer, "batch_first", True),
            )
            stages = {"embed": visual.conv1, "pre_norm": visual.ln_pre, "norm": visual.ln_post}
            blocks = _residual_blocks(transformer, "")
            self.towers["vision"] = Tower(
                "vision",
                "",
                blocks,
                _prefixed("visual"),
                tokens,
                stages=stages,
                forward=visual,
                position=(visual, "positional_embedding"),
            )
        else:
            raise TypeError(f"unsupported open_clip vision tower: {type(visual).__name__}")
        if hasattr(clip, "text"):  # CustomTextCLIP
            text = clip.text
            if not hasattr(text, "transformer"):
                raise TypeError(f"unsupported open_clip text tower: {type(text).__name__}")
            transformer, owns = text.transformer, _prefixed("text")
        else:
            transformer = clip.transformer
            owns = _prefixed("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection")
        self.towers["text"] = Tower(
            "text", "text.", _residual_blocks(transformer, "text."), owns, capabilities=frozenset({"text_prompts"})
        )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        module = sys.modules.get("open_clip.model")  # never imported: cannot be an open_clip model
        return module is not None and isinstance(model, (module.CLIP, module.CustomTextCLIP))

    # -- text tower hooks: token embedding, the blocks from embeddings, end-of-text pooling ----------------------
    def _text(self) -> nn.Module:
        return self.clip.text if hasattr(self.clip, "text") else self.clip

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    @property
    def text_batch_first(self) -> bool:
        """Whether the text tower's blocks take (batch, tokens, width) rather than (tokens, batch, width)."""
        return getattr(self._text().transformer, "batch_first", True)

    @property
    def text_width(self) -> int:
        return self._text().token_embedding.weight.shape[1]

    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text embedding space."""
        proj = self._text().text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[-1]

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's learned temperature (log scale) of image-text logits."""
        return self.clip.logit_scale

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (len(texts), context) with the CLIP vocabulary."""
        return clip_tokenize(texts, self.context_length, self.clip)

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, context) -> token embeddings (batch, context, width), before positions."""
        return self._text().token_embedding(tokens)

    def encode_text_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Runs the text tower from token embeddings (so some of them can be learned) to projected features.

        Args:
            embeddings: (batch, context, width) token embeddings without positional embedding.
            tokens: The (batch, context) token ids the embeddings stand for; they locate the end-of-text token.
        """
        from open_clip.transformer import text_global_pool

        text = self._text()
        if getattr(text, "cls_emb", None) is not None:
            raise TypeError("text towers with an appended class token (CoCa) are not supported")
        cast = text.transformer.get_cast_dtype() if hasattr(text.transformer, "get_cast_dtype") else embeddings.dtype
        x = embeddings.to(cast) + text.positional_embedding[: embeddings.shape[1]].to(cast)
        x = text.transformer(x, attn_mask=text.attn_mask)
        x = text.ln_final(x)
        pool_type = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
        eos = getattr(text, "text_eos_id", getattr(text, "eos_id", None))
        x = text_global_pool(x, tokens, pool_type, eos_token_id=eos)
        proj = text.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)

    def describe(self) -> dict:
        info = super().describe()
        info["embed_dim"] = self.embed_dim
        return info


# -- the library table's functions -------------------------------------------------------------------------------
def create(cfg: Any, num_classes: int = 0) -> nn.Module:
    """The open_clip model of ``cfg`` (the ``model`` section: architecture, pretrained tag or local file) with its
    own tokenizer recorded; ``num_classes`` is not used (its classifiers classify by class-name text)."""
    import open_clip

    if Path(cfg.name).expanduser().is_dir():
        return create_from_folder(cfg)
    if cfg.name not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model '{cfg.name}'{did_you_mean(cfg.name, open_clip.list_models())}")
    pretrained = cfg.checkpoint or (cfg.pretrained_tag if cfg.pretrained else None)
    if cfg.checkpoint and not Path(cfg.checkpoint).expanduser().is_file():
        raise ModelLoadError(f"checkpoint {cfg.checkpoint} does not exist")
    with offline_unless_reachable() as online:
        try:
            model = open_clip.create_model(cfg.name, pretrained=pretrained)
        except Exception as err:
            reason = str(err).splitlines()[0][:120] if online or cfg.checkpoint else "no network, not in the cache"
            raise ModelLoadError(
                f"could not load open_clip '{cfg.name}' with pretrained={pretrained!r} ({reason}); "
                "set model.checkpoint=/path/to/open_clip_weights.bin"
            ) from None
        try:  # the model's own tokenizer (CLIP BPE ships with open_clip; SigLIP's comes from the hub)
            model.__dict__["_visionpeft_tokenizer"] = open_clip.get_tokenizer(cfg.name)
        except Exception as err:
            reason = str(err).splitlines()[0][:120] if online else "no network, not in the cache"
            raise ModelLoadError(f"could not load the tokenizer of open_clip '{cfg.name}' ({reason})") from None
    return model


def create_from_folder(cfg: Any) -> nn.Module:
    """The CLIP of a local open_clip folder (``open_clip_config.json`` with ``model_cfg`` / ``preprocess_cfg``, and
    its weights file, as open_clip's hub folders and ``checkpoints/tiny_clip``), through open_clip's ``local-dir:``
    schema: no hub id, no network. ``model.pretrained=false`` builds the architecture with random weights;
    ``model.checkpoint`` loads that file instead of the folder's weights."""
    import open_clip

    folder = Path(cfg.name).expanduser()
    if not (folder / "open_clip_config.json").is_file():
        raise ModelLoadError(
            f"{cfg.name} is a folder without open_clip_config.json; an open_clip model folder holds it and its "
            "weights (open_clip_model.safetensors)"
        )
    name = f"local-dir:{folder}"
    try:
        model = open_clip.create_model(name, load_weights=cfg.pretrained and not cfg.checkpoint)
        if cfg.checkpoint:
            open_clip.load_checkpoint(model, str(Path(cfg.checkpoint).expanduser()))
    except Exception as err:
        raise ModelLoadError(
            f"could not load the open_clip folder {cfg.name} ({str(err).splitlines()[0][:160]})"
        ) from None
    model.__dict__["_visionpeft_tokenizer"] = open_clip.get_tokenizer(name)
    return model


def data_config(model: nn.Module) -> DataConfig:
    """The vision tower's ``image_mean`` / ``image_std`` (OpenAI's statistics when it has none) and its
    ``preprocess_cfg`` interpolation (bicubic by default); crop 1.0: resize the short side, center crop."""
    visual = model.visual
    if hasattr(visual, "image_mean"):
        mean, std = tuple(visual.image_mean or IMAGENET_MEAN), tuple(visual.image_std or IMAGENET_STD)
    else:
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    interpolation = (getattr(visual, "preprocess_cfg", None) or {}).get("interpolation", "bicubic")
    return DataConfig(mean, std, 1.0, interpolation)


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The vision tower's size: its timm trunk's (``TimmModel``), or ``image_size`` of open_clip's own
    ``VisionTransformer`` (fixed position embeddings)."""
    visual = model.visual
    trunk = getattr(visual, "trunk", visual)
    if getattr(trunk, "patch_embed", None) is not None:
        return timm_models.fixed_input_size(trunk)
    size = getattr(visual, "image_size", None)
    if size is not None and hasattr(visual, "positional_embedding"):
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return None
