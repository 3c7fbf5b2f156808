"""Tiny random-weight Flux and Stable Diffusion 3 pipelines, built offline (no hub file): diffusers' own tests build
theirs from config the same way; the tokenizers are the only files they download, so here the CLIP tokenizer comes
from open_clip's bundled BPE vocabulary (as the tiny SD pipelines') and the T5 one is a small Unigram model trained
with ``tokenizers`` on a few words (``benchmarks.t5_vocab``, which the GPU suite's Flux rows use too)."""

from __future__ import annotations

from pathlib import Path

import torch
from benchmarks import layouts
from benchmarks.t5_vocab import t5_tokenizer


def tiny_t5(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer ``T5EncoderModel`` of width 32 (random weights): ``benchmarks.layouts.tiny_t5``."""
    torch.manual_seed(seed)
    return layouts.tiny_t5(vocab_size).eval()


def _clip_config(vocab: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=16,
        hidden_act="gelu",
    )


def tiny_flow_vae():
    """The tiny 2-level KL autoencoder with Flux / SD3's latent normalisation (a shift as well as a scale; no quant
    convolutions, as Flux's and SD3's VAEs)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_flux_pipeline(directory, seed: int = 0, guidance: bool = True):
    """A complete ``FluxPipeline`` with random weights: one double- and one single-stream block (width 32, two heads
    of 16, rotary axes 4 + 4 + 8), a guidance embedding when ``guidance`` (FLUX.1-dev; -schnell has none), CLIP-L's
    layout at width 16 (pooled) over the real BPE vocabulary, a tiny T5 (width 32), the tiny VAE (4 latent channels
    at half the image size, packed 2 x 2 into 16) and FLUX.1's dynamically shifted flow-matching scheduler."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from visionpeft.data.clip_vocab import clip_tokenizer

    directory = Path(directory)
    tokenizer = clip_tokenizer(directory / "clip")
    tokenizer_2 = t5_tokenizer(directory / "t5")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer))).eval()
    text_encoder_2 = tiny_t5(len(tokenizer_2), seed)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    scheduler = layouts.flux_scheduler()
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_flow_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(directory, seed: int = 0):
    """A complete ``StableDiffusion3Pipeline`` with random weights: two MMDiT joint blocks (width 16, two heads of
    8, patch 2; the first with SD 3.5's second image attention, the last reading the text without updating it), two
    ``CLIPTextModelWithProjection`` (CLIP-L's and CLIP-G's layout at width 16, projections 16: pooled 32) over the real
    BPE vocabulary, a tiny T5 (width 32), the tiny VAE and SD3's flow-matching scheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from visionpeft.data.clip_vocab import clip_tokenizer

    directory = Path(directory)
    tokenizer = clip_tokenizer(directory / "clip")
    tokenizer_3 = t5_tokenizer(directory / "t5")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_config(len(tokenizer))).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(len(tokenizer))).eval()
    text_encoder_3 = tiny_t5(len(tokenizer_3), seed)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_flow_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_flow_images(pipe, prompt: str, **options):
    """Two sampling steps at 16 px with a fixed seed and a short T5 sequence: a cheap, deterministic picture of a
    flow pipeline's behaviour."""
    return pipe(
        prompt,
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="np",
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        **options,
    ).images
