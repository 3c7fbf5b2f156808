"""diffusers backbones: ``UNet2DConditionModel`` (Stable Diffusion) and ``DiTTransformer2DModel`` (DiT)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .base import Backbone, Block, Branch, Projection, Tower


def _is_diffusers(model: nn.Module, class_name: str) -> bool:
    if not type(model).__module__.startswith("diffusers"):
        return False
    return any(cls.__name__ == class_name for cls in type(model).__mro__)


def _attention_projections(prefix: str, attn: nn.Module) -> dict[str, Projection]:
    return {
        f"{prefix}.q": Projection("linear", attn, "to_q"),
        f"{prefix}.k": Projection("linear", attn, "to_k"),
        f"{prefix}.v": Projection("linear", attn, "to_v"),
        f"{prefix}.o": Projection("linear", attn.to_out, "0"),
    }


def _exact_output(attn: nn.Module) -> bool:
    """A scale on an Attention's output folds into ``to_out[0]`` unless the module adds its input or rescales."""
    return not getattr(attn, "residual_connection", False) and getattr(attn, "rescale_output_factor", 1.0) == 1.0


def transformer_block(name: str, blk: nn.Module) -> Block:
    """Describes a diffusers ``BasicTransformerBlock``: self-attention, optional cross-attention, feed-forward."""
    projections: dict[str, Projection] = {}
    branches: dict[str, Branch] = {}
    norms = {"attn1": blk.norm1, "attn2": blk.norm2, "ff": blk.norm3 if blk.norm3 is not None else blk.norm2}
    for attn_name in ("attn1", "attn2"):
        attn = getattr(blk, attn_name, None)
        if attn is None:
            continue
        projections.update(_attention_projections(attn_name, attn))
        norm = norms[attn_name] if isinstance(norms[attn_name], nn.LayerNorm) else None
        branches[attn_name] = Branch(attn, projections[f"{attn_name}.o"], norm, _exact_output(attn))
    ff_in = getattr(blk.ff.net[0], "proj", None)
    if isinstance(ff_in, nn.Linear):
        projections["ff.fc1"] = Projection("linear", blk.ff.net[0], "proj")
    projections["ff.fc2"] = Projection("linear", blk.ff.net, "2")
    ff_norm = norms["ff"] if isinstance(norms["ff"], nn.LayerNorm) else None
    branches["ff"] = Branch(blk.ff, projections["ff.fc2"], ff_norm)
    return Block(name, blk, branches, projections)


def _resnet_block(name: str, resnet: nn.Module) -> Block:
    projections = {
        "resnet.conv1": Projection("conv", resnet, "conv1"),
        "resnet.conv2": Projection("conv", resnet, "conv2"),
    }
    if isinstance(getattr(resnet, "time_emb_proj", None), nn.Linear):
        projections["resnet.time_emb"] = Projection("linear", resnet, "time_emb_proj")
    return Block(name, resnet, {}, projections)


def _unet_stages(model: nn.Module) -> dict[str, nn.Module]:
    """The U-Net's stage modules: ``model`` (the whole U-Net: a hook on it sees every call's arguments, e.g. to pass
    ControlNet residuals), then in forward order ``conv_in``, ``time_embedding``, ``down.i``, ``mid``, ``up.i``,
    ``conv_out``."""
    stages = {"model": model, "conv_in": model.conv_in, "time_embedding": model.time_embedding}
    stages.update({f"down.{i}": block for i, block in enumerate(model.down_blocks)})
    if model.mid_block is not None:
        stages["mid"] = model.mid_block
    stages.update({f"up.{i}": block for i, block in enumerate(model.up_blocks)})
    stages["conv_out"] = model.conv_out
    return stages


def _dit_stages(model: nn.Module) -> dict[str, nn.Module]:
    """The DiT's modules around its blocks: patch + position embedding, final norm and output projections."""
    names = ("pos_embed", "norm_out", "proj_out_1", "proj_out_2")
    return {name: getattr(model, name) for name in names if isinstance(getattr(model, name, None), nn.Module)}


def _unet_stage_blocks(stage: str, index: str, block: nn.Module) -> list[Block]:
    blocks = []
    for j, resnet in enumerate(getattr(block, "resnets", None) or []):
        blocks.append(_resnet_block(f"{stage}{index}.resnet.{j}", resnet))
    for j, transformer in enumerate(getattr(block, "attentions", None) or []):
        for k, blk in enumerate(getattr(transformer, "transformer_blocks", [])):
            blocks.append(transformer_block(f"{stage}{index}.attn.{j}.block.{k}", blk))
    return blocks


class DiffusersUNet(Backbone):
    """Adapter for ``diffusers.UNet2DConditionModel``: every transformer block (self- and cross-attention,
    feed-forward) of every down / mid / up block, and every resnet block (conv1, conv2, time embedding)."""

    family = "diffusers_unet"
    default_tower = "unet"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        blocks: list[Block] = []
        for i, block in enumerate(model.down_blocks):
            blocks += _unet_stage_blocks("down", f".{i}", block)
        if model.mid_block is not None:
            blocks += _unet_stage_blocks("mid", "", model.mid_block)
        for i, block in enumerate(model.up_blocks):
            blocks += _unet_stage_blocks("up", f".{i}", block)
        self.towers["unet"] = Tower(
            "unet", "", blocks, lambda name: True, stages=_unet_stages(model), capabilities=frozenset({"unet"})
        )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_diffusers(model, "UNet2DConditionModel")

    def diffusers_lora_group(self, path: str) -> tuple[str, str] | None:
        return "unet", path

    def diffusers_component(self, component: str) -> tuple[str, str] | None:
        return ("unet", "") if component == "unet" else None

    def describe(self) -> dict:
        info = super().describe()
        cfg = self.inner.config
        info.update(block_out_channels=list(cfg.block_out_channels), cross_attention_dim=cfg.cross_attention_dim)
        return info


class DiffusersDiT(Backbone):
    """Adapter for ``diffusers.DiTTransformer2DModel``: its adaLN-Zero transformer blocks.

    The original DiT has one timestep embedder and one class-label table; diffusers' conversion copies them into
    every block (``transformer_blocks.i.norm1.emb``, and the final layer reads block 0's). While methods are
    attached, identical copies are shared as the one module they were, so DiffFit trains the paper's single
    "class condition module" (and one set of timestep-embedder biases), not 28 diverging copies. Outputs do not
    change; :meth:`release` gives every block its own copy again (what ``save_pretrained`` needs).
    """

    family = "diffusers_dit"
    default_tower = "dit"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.shared_condition = _share_condition_embedders(model)
        blocks = [transformer_block(f"blocks.{i}", blk) for i, blk in enumerate(model.transformer_blocks)]
        self.towers["dit"] = Tower(
            "dit",
            "",
            blocks,
            lambda name: True,
            condition=lambda name: ".class_embedder." in name,
            stages=_dit_stages(model),
        )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_diffusers(model, "DiTTransformer2DModel")

    def class_table(self) -> nn.Embedding:
        """The class-label embedding table (``num_embeds_ada_norm`` classes + the null class of guidance)."""
        return self.inner.transformer_blocks[0].norm1.emb.class_embedder.embedding_table

    def label_embedders(self) -> list[nn.Module]:
        """The distinct modules embedding class labels (in train mode each drops labels to the null class)."""
        found = {id(b.norm1.emb.class_embedder): b.norm1.emb.class_embedder for b in self.inner.transformer_blocks}
        return list(found.values())

    def release(self) -> None:
        super().release()
        if self.shared_condition:
            for block in self.inner.transformer_blocks[1:]:
                block.norm1.emb = copy.deepcopy(block.norm1.emb)
            self.shared_condition = False

    def describe(self) -> dict:
        info = super().describe()
        cfg = self.inner.config
        info.update(num_layers=cfg.num_layers, inner_dim=cfg.num_attention_heads * cfg.attention_head_dim)
        return info


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_meta or b.is_meta:  # no values to compare: a meta model (parameter counting) is shared by shape
        return a.shape == b.shape
    return torch.equal(a, b)


def _share_condition_embedders(model: nn.Module) -> bool:
    """Makes every block use block 0's timestep + class embedder when all copies are equal; says if it did."""
    embedders = [getattr(getattr(b, "norm1", None), "emb", None) for b in model.transformer_blocks]
    if len(embedders) < 2 or any(e is None for e in embedders):
        return False
    first = embedders[0]
    if all(e is first for e in embedders):
        return True
    reference = first.state_dict()
    for other in embedders[1:]:
        state = other.state_dict()
        if state.keys() != reference.keys() or not all(_same(state[k], reference[k]) for k in reference):
            return False
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = first
    return True


def _text_model(text_encoder: nn.Module) -> nn.Module:
    """The CLIP text transformer: transformers < 5 nests it under ``text_model``; 5.x does not for
    ``CLIPTextModel`` but still does for ``CLIPTextModelWithProjection`` (SDXL's second encoder)."""
    return getattr(text_encoder, "text_model", text_encoder)


def clip_text_tower(text_encoder: nn.Module, prefix: str, owns, name: str = "text_encoder") -> Tower:
    """Describes a transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` (a Stable Diffusion text
    encoder) as the tower ``name``."""
    blocks = []
    for i, layer in enumerate(_text_model(text_encoder).encoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        projections = {
            "attn.q": Projection("linear", attn, "q_proj"),
            "attn.k": Projection("linear", attn, "k_proj"),
            "attn.v": Projection("linear", attn, "v_proj"),
            "attn.o": Projection("linear", attn, "out_proj"),
            "mlp.fc1": Projection("linear", mlp, "fc1"),
            "mlp.fc2": Projection("linear", mlp, "fc2"),
        }
        branches = {
            "attn": Branch(attn, projections["attn.o"], layer.layer_norm1),
            "mlp": Branch(mlp, projections["mlp.fc2"], layer.layer_norm2),
        }
        blocks.append(Block(f"{prefix}blocks.{i}", layer, branches, projections))
    return Tower(name, prefix, blocks, owns)


#: The pipeline components visionpeft adapts, with the tokenizer each text encoder reads (SDXL has two of each; a
#: flow-matching pipeline has a ``transformer``, and SD3 a third encoder, T5).
PIPELINE_COMPONENTS = {
    "unet": None,
    "transformer": None,
    "text_encoder": "tokenizer",
    "text_encoder_2": "tokenizer_2",
    "text_encoder_3": "tokenizer_3",
}


class PipelineModules(nn.Module):
    """The trainable parts of a Stable Diffusion pipeline under one module (the pipeline itself is no module).

    Parameters are named ``unet.*``, ``text_encoder.*`` (and SDXL's ``text_encoder_2.*``; a Flux / SD3 pipeline's
    ``transformer.*`` and ``text_encoder_2.*`` / ``text_encoder_3.*``); the tokenizers stay on the pipeline.
    """

    def __init__(self, pipeline) -> None:
        super().__init__()
        for name in PIPELINE_COMPONENTS:
            if isinstance(getattr(pipeline, name, None), nn.Module):
                setattr(self, name, getattr(pipeline, name))
        self.__dict__["pipeline"] = pipeline  # not a submodule

    def holds(self, pipeline) -> bool:
        """The holder still has exactly the pipeline's current components."""
        return all(getattr(self, name, None) is getattr(pipeline, name, None) for name in PIPELINE_COMPONENTS)

    def text_encoders(self) -> list[str]:
        """The text-encoder components, in the order the pipeline joins their outputs."""
        return [name for name, tokenizer in PIPELINE_COMPONENTS.items() if tokenizer and hasattr(self, name)]

    def tokenizer_of(self, text_encoder: str = "text_encoder"):
        """The tokenizer feeding ``text_encoder``."""
        return getattr(self.pipeline, PIPELINE_COMPONENTS[text_encoder])

    def replace_tokenizer_of(self, text_encoder: str, tokenizer) -> None:
        """Gives the pipeline another tokenizer for ``text_encoder``."""
        setattr(self.pipeline, PIPELINE_COMPONENTS[text_encoder], tokenizer)

    @property
    def tokenizer(self):
        return self.tokenizer_of("text_encoder")


#: diffusers' flow-matching transformers (described in :mod:`.diffusers_flow`) -> their family name.
FLOW_TRANSFORMERS = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}


def flow_family(transformer: nn.Module | None) -> str | None:
    """``flux`` / ``sd3`` for a diffusers Flux / SD3 transformer (or a subclass), else None."""
    if transformer is None or not type(transformer).__module__.startswith("diffusers"):
        return None
    return next(
        (FLOW_TRANSFORMERS[c.__name__] for c in type(transformer).__mro__ if c.__name__ in FLOW_TRANSFORMERS), None
    )


def pipeline_modules(pipeline) -> nn.Module:
    """The module visionpeft adapts for a diffusers pipeline: the U-Net + text encoder(s) of an SD / SDXL pipeline,
    or the transformer + text encoders of a Flux / SD3 pipeline (cached on the pipeline), or the transformer of a DiT
    pipeline."""
    denoiser = getattr(pipeline, "unet", None)
    if denoiser is None and flow_family(getattr(pipeline, "transformer", None)) is not None:
        denoiser = pipeline.transformer
    if denoiser is not None and getattr(pipeline, "text_encoder", None) is not None:
        holder = pipeline.__dict__.get("_visionpeft_modules")
        if holder is None or not holder.holds(pipeline):
            holder = PipelineModules(pipeline)
            pipeline.__dict__["_visionpeft_modules"] = holder
        return holder
    for attr in ("unet", "transformer"):
        if isinstance(getattr(pipeline, attr, None), nn.Module):
            return getattr(pipeline, attr)
    return pipeline


def _under(prefix: str):
    return lambda name: name.startswith(prefix)


class DiffusersPipeline(Backbone):
    """Adapter for a Stable Diffusion 1.x / 2.x pipeline: the ``unet`` tower (as :class:`DiffusersUNet`) and the
    ``text_encoder`` tower (CLIP text layers; textual inversion edits its token embedding)."""

    family = "diffusers_sd_pipeline"
    default_tower = "unet"
    #: the diffusers pipeline class whose ``save_lora_weights`` / ``load_lora_weights`` use this layout
    lora_pipeline_class = "StableDiffusionPipeline"

    def __init__(self, model: PipelineModules) -> None:
        super().__init__(model)
        unet = DiffusersUNet(model.unet).towers["unet"]
        self.towers["unet"] = Tower(
            "unet", "", unet.blocks, _under("unet."), stages=unet.stages, capabilities=unet.capabilities
        )
        for name in model.text_encoders():
            text = clip_text_tower(getattr(model, name), f"{name}.", _under(f"{name}."), name)
            text.capabilities = frozenset({"new_tokens"})  # its tokenizer can grow with the embedding table
            self.towers[name] = text

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, PipelineModules) and hasattr(model, "unet") and not is_sdxl(model)

    def text_encoders(self) -> list[str]:
        """The text towers that read every prompt, each through its own tokenizer."""
        return self.inner.text_encoders()

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    def tokenizer_of(self, tower: str = "text_encoder"):
        """The tokenizer of the text tower ``tower``."""
        return self.inner.tokenizer_of(tower)

    def replace_tokenizer(self, tokenizer, tower: str = "text_encoder") -> None:
        """Gives the pipeline another tokenizer for ``tower`` (one with new tokens, or the original back)."""
        self.inner.replace_tokenizer_of(tower, tokenizer)

    def token_embedding_slot(self, tower: str = "text_encoder") -> tuple[nn.Module, str]:
        """(parent, attribute) of a text encoder's token embedding."""
        return _text_model(getattr(self.inner, tower)).embeddings, "token_embedding"

    def diffusers_lora_group(self, path: str) -> tuple[str, str] | None:
        group, _, local = path.partition(".")
        return group, local

    def diffusers_component(self, component: str) -> tuple[str, str] | None:
        return (component, component + ".") if component in self.towers else None

    def describe(self) -> dict:
        info = super().describe()
        cfg = self.inner.unet.config
        info.update(
            block_out_channels=list(cfg.block_out_channels),
            cross_attention_dim=cfg.cross_attention_dim,
            text_hidden_size=self.inner.text_encoder.config.hidden_size,
        )
        return info


def is_sdxl(model: PipelineModules) -> bool:
    """A Stable Diffusion XL pipeline's modules: two text encoders and a U-Net taking SDXL's added conditions (the
    pooled text embedding of encoder 2 and six time ids)."""
    unet = getattr(model, "unet", None)
    return (
        hasattr(model, "text_encoder_2") and unet is not None and unet.config.get("addition_embed_type") == "text_time"
    )


class DiffusersXLPipeline(DiffusersPipeline):
    """Adapter for a Stable Diffusion XL pipeline: the ``unet`` tower and both text towers, ``text_encoder``
    (CLIP ViT-L's ``CLIPTextModel``) and ``text_encoder_2`` (OpenCLIP ViT-bigG's ``CLIPTextModelWithProjection``,
    whose modules keep transformers' ``text_model.`` level), each with its own tokenizer; textual inversion adds
    its tokens to both. Canonical names and diffusers' LoRA groups are the component names."""

    family = "diffusers_sdxl_pipeline"
    lora_pipeline_class = "StableDiffusionXLPipeline"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, PipelineModules) and is_sdxl(model)

    def describe(self) -> dict:
        info = super().describe()
        info.update(
            text_hidden_size_2=self.inner.text_encoder_2.config.hidden_size,
            addition_time_embed_dim=self.inner.unet.config.addition_time_embed_dim,
        )
        return info
