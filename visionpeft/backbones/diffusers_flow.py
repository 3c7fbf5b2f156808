"""Flow-matching transformer pipelines: Flux (``FluxTransformer2DModel``) and Stable Diffusion 3 / 3.5
(``SD3Transformer2DModel``, MMDiT), with their text encoders.

The transformer is the ``transformer`` tower. Canonical block and projection names (LoRA ``targets`` match them by
suffix, as on a U-Net):

- Flux double-stream blocks ``double.{i}`` and SD3 joint blocks ``blocks.{i}``: image attention ``attn.q/k/v/o``
  (``attn.to_q/k/v``, ``attn.to_out.0``), text attention ``attn.add_q/add_k/add_v/add_o`` (``attn.add_*_proj``,
  ``attn.to_add_out``), feed-forwards ``ff.fc1/fc2`` and ``ff_context.fc1/fc2`` (``net.0.proj``, ``net.2``); SD 3.5's
  second image attention ``attn2.q/k/v/o``. The last SD3 block reads the text without updating it (no
  ``to_add_out``, no ``ff_context``).
- Flux single-stream blocks ``single.{i}``: ``attn.q/k/v`` (no output projection of their own), ``mlp.fc1``
  (``proj_mlp``) and ``out`` (``proj_out``, which reads the attention and MLP outputs side by side).

Residual branches (DiffFit's scales): ``attn`` (image half of the joint attention), ``attn_context`` (its text half,
``to_add_out``'s output), ``attn2``, ``ff``, ``ff_context``; a single-stream block's one branch ``attn_mlp``
(``proj_out``'s output). Each scale folds exactly into its output projection. Block modules take the image tokens
(batch, tokens, width) first, so token hooks work as on a DiT.

The text towers are the CLIP encoders (``text_encoder``: CLIP-L; SD3's ``text_encoder_2``: OpenCLIP-G), which
diffusers' DreamBooth-LoRA scripts train with ``--train_text_encoder``; the T5 encoder (Flux ``text_encoder_2``, SD3
``text_encoder_3``) stays frozen and undescribed. Textual inversion is not offered: a new token would reach the CLIP
encoders and not T5.
"""

from __future__ import annotations

from torch import nn

from .base import Block, Branch, Projection, Tower
from .diffusers_models import DiffusersPipeline, PipelineModules, clip_text_tower, flow_family


#: The flow-matching transformer classes a pipeline's ``transformer`` may be, with the family name.
def _linear(parent: nn.Module, attr: str) -> Projection | None:
    return Projection("linear", parent, attr) if isinstance(getattr(parent, attr, None), nn.Linear) else None


def _feed_forward(prefix: str, ff: nn.Module | None) -> dict[str, Projection]:
    if ff is None:
        return {}
    found = {f"{prefix}.fc1": _linear(ff.net[0], "proj"), f"{prefix}.fc2": _linear(ff.net, "2")}
    return {name: proj for name, proj in found.items() if proj is not None}


def _attention(prefix: str, attn: nn.Module | None) -> dict[str, Projection]:
    if attn is None:
        return {}
    found = {
        f"{prefix}.q": _linear(attn, "to_q"),
        f"{prefix}.k": _linear(attn, "to_k"),
        f"{prefix}.v": _linear(attn, "to_v"),
        f"{prefix}.o": _linear(attn.to_out, "0") if getattr(attn, "to_out", None) is not None else None,
        f"{prefix}.add_q": _linear(attn, "add_q_proj"),
        f"{prefix}.add_k": _linear(attn, "add_k_proj"),
        f"{prefix}.add_v": _linear(attn, "add_v_proj"),
        f"{prefix}.add_o": _linear(attn, "to_add_out"),
    }
    return {name: proj for name, proj in found.items() if proj is not None}


def joint_block(name: str, blk: nn.Module) -> Block:
    """A Flux double-stream block or an SD3 joint (MMDiT) block: joint attention over image and text tokens, one
    feed-forward per stream (see the module docstring for the names)."""
    projections = {
        **_attention("attn", blk.attn),
        **_attention("attn2", getattr(blk, "attn2", None)),
        **_feed_forward("ff", blk.ff),
        **_feed_forward("ff_context", getattr(blk, "ff_context", None)),
    }
    branches = {"attn": Branch(blk.attn, projections["attn.o"])}
    if "attn.add_o" in projections:
        branches["attn_context"] = Branch(blk.attn.to_add_out, projections["attn.add_o"])
    if "attn2.o" in projections:
        branches["attn2"] = Branch(blk.attn2, projections["attn2.o"])
    for ff in ("ff", "ff_context"):
        if f"{ff}.fc2" in projections:
            branches[ff] = Branch(getattr(blk, ff), projections[f"{ff}.fc2"])
    return Block(name, blk, branches, projections)


def single_block(name: str, blk: nn.Module) -> Block:
    """A Flux single-stream block: attention and MLP side by side on the joined tokens, one output projection."""
    projections = {
        **_attention("attn", blk.attn),
        "mlp.fc1": Projection("linear", blk, "proj_mlp"),
        "out": Projection("linear", blk, "proj_out"),
    }
    return Block(name, blk, {"attn_mlp": Branch(blk.proj_out, projections["out"])}, projections)


def flow_blocks(transformer: nn.Module) -> list[Block]:
    """The described blocks of a Flux or SD3 transformer, in forward order."""
    if flow_family(transformer) == "flux":
        blocks = [joint_block(f"double.{i}", b) for i, b in enumerate(transformer.transformer_blocks)]
        return blocks + [single_block(f"single.{i}", b) for i, b in enumerate(transformer.single_transformer_blocks)]
    return [joint_block(f"blocks.{i}", b) for i, b in enumerate(transformer.transformer_blocks)]


def _stages(transformer: nn.Module) -> dict[str, nn.Module]:
    """``model`` (the whole transformer: a hook on it sees every call's arguments) and the modules around the
    blocks: the patch embedding (Flux ``x_embedder``, SD3 ``pos_embed``), the text projection, the timestep / pooled
    text (/ guidance) embedding, the final norm and output projection."""
    names = ("x_embedder", "pos_embed", "context_embedder", "time_text_embed", "norm_out", "proj_out")
    stages = {"model": transformer}
    stages.update({n: getattr(transformer, n) for n in names if isinstance(getattr(transformer, n, None), nn.Module)})
    return stages


def _under(prefix: str):
    return lambda name: name.startswith(prefix)


class DiffusersFlowPipeline(DiffusersPipeline):
    """Adapter for a flow-matching transformer pipeline: the ``transformer`` tower and the CLIP text towers (see the
    module docstring). diffusers' LoRA groups are the component names (``transformer``, ``text_encoder``,
    ``text_encoder_2``). Subclasses name the transformer family and the pipeline class whose LoRA loader reads the
    layout."""

    default_tower = "transformer"
    #: ``flux`` / ``sd3`` (:func:`flow_family`)
    flow_family = ""

    def __init__(self, model: PipelineModules) -> None:
        super(DiffusersPipeline, self).__init__(model)
        transformer = model.transformer
        self.towers["transformer"] = Tower(
            "transformer",
            "",
            flow_blocks(transformer),
            _under("transformer."),
            stages=_stages(transformer),
            capabilities=frozenset({"flow_transformer"}),  # a ControlNet builds from it (from_transformer)
        )
        for name in self.text_encoders():
            self.towers[name] = clip_text_tower(getattr(model, name), f"{name}.", _under(f"{name}."), name)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return (
            isinstance(model, PipelineModules) and flow_family(getattr(model, "transformer", None)) == cls.flow_family
        )

    def latent_encoder(self) -> nn.Module | None:
        """The pipeline's VAE, which encodes a flow ControlNet's condition image (not a tower: it stays frozen)."""
        pipeline = getattr(self.inner, "pipeline", None)
        return getattr(pipeline, "vae", None)

    def text_encoders(self) -> list[str]:
        """The CLIP text encoders (T5 is not described: see the module docstring)."""
        return [name for name in self.inner.text_encoders() if is_clip_text(getattr(self.inner, name))]

    def describe(self) -> dict:
        info = super(DiffusersPipeline, self).describe()
        cfg = self.inner.transformer.config
        info.update(
            num_layers=cfg.num_layers,
            inner_dim=cfg.num_attention_heads * cfg.attention_head_dim,
            joint_attention_dim=cfg.joint_attention_dim,
        )
        return info


class DiffusersFluxPipeline(DiffusersFlowPipeline):
    """A Flux pipeline: ``FluxTransformer2DModel`` (double- and single-stream blocks), CLIP-L (pooled) + T5."""

    family = "diffusers_flux_pipeline"
    flow_family = "flux"
    lora_pipeline_class = "FluxPipeline"
    #: ``save_adapter(format="kohya")`` writes Black Forest Labs' names (:mod:`visionpeft.checkpoint.flux_kohya`)
    kohya_layout = "flux"


class DiffusersSD3Pipeline(DiffusersFlowPipeline):
    """A Stable Diffusion 3 / 3.5 pipeline: ``SD3Transformer2DModel`` (MMDiT joint blocks), CLIP-L + CLIP-G + T5."""

    family = "diffusers_sd3_pipeline"
    flow_family = "sd3"
    lora_pipeline_class = "StableDiffusion3Pipeline"
    #: why ``save_adapter(format="kohya")`` writes nothing: no kohya SD3 file is one diffusers loads
    kohya_refusal = (
        "an SD3 adapter has no kohya file diffusers loads: sd-scripts' layout (networks/lora_sd3.py: the original "
        "MMDiT's lora_unet_joint_blocks_<i>_x_block_attn_qkv, ...) is one StableDiffusion3Pipeline.load_lora_weights "
        "converts nothing of and loads nothing from; save with format='diffusers' (save_lora_weights' layout)"
    )


def is_clip_text(encoder: nn.Module) -> bool:
    """A transformers CLIP text model (``CLIPTextModel`` / ``CLIPTextModelWithProjection``), not T5."""
    return type(encoder).__name__.startswith("CLIPText")
