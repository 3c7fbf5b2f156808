"""The components of Stable Diffusion XL, FLUX.1-dev and Stable Diffusion 3.5 medium from their published config
values, randomly initialised: built under ``torch.device("meta")`` they give exact parameter and FLOP counts without
memory (``benchmarks.flops``); built on a GPU they are what the GPU suite times (a step's cost does not depend on the
weights). Each family also has a ``tiny`` layout (the same block types at small widths) on which the same code runs
on a CPU in seconds.
"""

from __future__ import annotations

#: CLIP's BPE vocabulary (CLIP ViT-L and OpenCLIP ViT-bigG share it) and T5 v1.1's SentencePiece vocabulary
CLIP_VOCAB = 49408
T5_VOCAB = 32128
#: the layouts each family's builder takes: the published one, or ``tiny``
SDXL_LAYOUTS = ("sdxl", "tiny")
FLUX_LAYOUTS = ("flux", "tiny")


def clip_text(hidden: int, layers: int, heads: int, act: str, projection: bool = False, vocab_size: int = CLIP_VOCAB):
    """A CLIP text tower: ``CLIPTextModel``, or ``CLIPTextModelWithProjection`` (projection as wide as the tower)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act=act,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def clip_l(projection: bool = False, vocab_size: int = CLIP_VOCAB):
    """openai/clip-vit-large-patch14's text tower (the ``text_encoder`` config.json of SD 1.5, SDXL, FLUX.1-dev and
    SD3.5: 768 wide, 12 layers, 12 heads, quick GELU): 123,060,480 parameters, 123,650,304 with SD3's projection."""
    return clip_text(768, 12, 12, "quick_gelu", projection, vocab_size)


def clip_g(vocab_size: int = CLIP_VOCAB):
    """OpenCLIP ViT-bigG's text tower with its projection (SDXL's and SD3.5's ``text_encoder_2`` config.json: 1280
    wide, 32 layers, 20 heads, GELU): 694,659,840 parameters."""
    return clip_text(1280, 32, 20, "gelu", True, vocab_size)


def t5_encoder(
    d_model: int = 4096,
    d_ff: int = 10240,
    layers: int = 24,
    heads: int = 64,
    vocab_size: int = T5_VOCAB,
    buckets: tuple[int, int] = (32, 128),
):
    """A T5 v1.1 encoder (gated GELU, no bias, relative attention: ``buckets`` = (number, max distance)); the
    defaults are T5-XXL's (google/t5-v1_1-xxl: 4096 wide, 24 layers, 64 heads of 64, feed-forward 10240, vocabulary
    32128: FLUX.1-dev's ``text_encoder_2`` and SD3.5's ``text_encoder_3``): 4,762,310,656 parameters."""
    from visionpeft.demo.tiny_flux_parts import t5_encoder as build

    return build(d_model, d_ff, layers, heads, vocab_size, buckets)


def tiny_t5(vocab_size: int):
    """A 2-layer T5 v1.1 encoder of width 32 (4 heads of 8, feed-forward 64, 8 relative-position buckets)."""
    return t5_encoder(32, 64, 2, 4, vocab_size, buckets=(8, 16))


def kl_vae(widths: tuple[int, ...], latent_channels: int, flow: bool, norm_groups: int = 32):
    """A KL autoencoder with SD's block layout (2 ResNets per level); ``flow``: Flux's / SD3's (no quant
    convolutions, a shift as well as a scale, set by the caller)."""
    from diffusers import AutoencoderKL

    options = {"use_quant_conv": False, "use_post_quant_conv": False} if flow else {}
    return AutoencoderKL(
        block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        layers_per_block=2,
        latent_channels=latent_channels,
        norm_num_groups=norm_groups,
        **options,
    )


def sdxl_parts(layout: str = "sdxl", vocab_size: int = CLIP_VOCAB) -> dict:
    """Stable Diffusion XL base 1.0's components from the config values of
    ``stabilityai/stable-diffusion-xl-base-1.0`` (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``
    config.json files): U-Net 2,567,463,684, VAE 83,653,863, CLIP ViT-L 123,060,480, OpenCLIP ViT-bigG with
    projection 694,659,840. ``tiny``: the same block types (no attention at the first level, then two linear-projection
    transformer layers, ``text_time`` added conditions) at widths 32 / 64, a VAE that downsamples by 2."""
    from diffusers import UNet2DConditionModel

    if layout not in SDXL_LAYOUTS:
        raise ValueError(f"layout must be one of {SDXL_LAYOUTS}, not {layout!r}")
    if layout == "tiny":
        unet = UNet2DConditionModel(
            sample_size=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(4, 8),
            norm_num_groups=8,
            use_linear_projection=True,
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        )
        text = clip_text(32, 2, 2, "quick_gelu", vocab_size=vocab_size)
        return {
            "unet": unet,
            "vae": kl_vae((32, 64), 4, flow=False, norm_groups=8),
            "text_encoder": text,
            "text_encoder_2": clip_text(32, 2, 2, "gelu", True, vocab_size),
        }
    unet = UNet2DConditionModel(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    return {
        "unet": unet,
        "vae": kl_vae((128, 256, 512, 512), 4, flow=False),
        "text_encoder": clip_l(vocab_size=vocab_size),
        "text_encoder_2": clip_g(vocab_size),
    }


def flux_parts(layout: str = "flux", vocab_size: int = CLIP_VOCAB, t5_vocab_size: int = T5_VOCAB) -> dict:
    """FLUX.1-dev's components from the config values of ``black-forest-labs/FLUX.1-dev`` (``transformer``, ``vae``,
    ``text_encoder``, ``text_encoder_2`` config.json files): transformer 11,901,408,320 (19 double- and 38
    single-stream blocks, guidance embedding), VAE 83,819,683 (16 latent channels, no quant convolutions), CLIP ViT-L
    123,060,480, T5-XXL 4,762,310,656. ``tiny``: one double- and one single-stream block of width 32, CLIP and T5 at
    width 32, a VAE that downsamples by 2."""
    from diffusers import FluxTransformer2DModel

    if layout not in FLUX_LAYOUTS:
        raise ValueError(f"layout must be one of {FLUX_LAYOUTS}, not {layout!r}")
    tiny = layout == "tiny"
    latent = 4 if tiny else 16
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=latent * 4,  # 2 x 2 packed latents
        num_layers=1 if tiny else 19,
        num_single_layers=1 if tiny else 38,
        attention_head_dim=16 if tiny else 128,
        num_attention_heads=2 if tiny else 24,
        joint_attention_dim=32 if tiny else 4096,
        pooled_projection_dim=32 if tiny else 768,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8) if tiny else (16, 56, 56),
    )
    vae = kl_vae((32, 64) if tiny else (128, 256, 512, 512), latent, flow=True, norm_groups=8 if tiny else 32)
    vae.register_to_config(shift_factor=0.1159, scaling_factor=0.3611)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": clip_text(32, 2, 2, "quick_gelu", vocab_size=vocab_size) if tiny else clip_l(False, vocab_size),
        "text_encoder_2": tiny_t5(t5_vocab_size) if tiny else t5_encoder(vocab_size=t5_vocab_size),
    }


def flux_scheduler():
    """FLUX.1-dev's ``FlowMatchEulerDiscreteScheduler`` (its scheduler_config.json: shift 3, dynamic shifting between
    0.5 and 1.15 over 256 .. 4096 image tokens)."""
    from visionpeft.demo.tiny_flux_parts import flux_scheduler as build

    return build()


def sd3_parts(vocab_size: int = CLIP_VOCAB) -> dict:
    """Stable Diffusion 3.5 medium's components. The MMDiT's values are those diffusers'
    ``scripts/convert_sd3_to_diffusers.py`` (at 58eb52c, lines 291-321) derives from a checkpoint, for the medium
    one: depth 24 (the count below is Stability's "2.5B" only at 24; 3.5 large has 38), ``num_attention_heads =
    num_layers`` = 24 heads of 64 (1536 wide; the 38 heads of 64 are 3.5 large's), ``caption_projection_dim`` 1536
    (the context embedder's width), a 384 x 384 position table (line 301: "sd3.5 2b use pos_embed_max_size=384";
    ``loaders/single_file_utils.py`` lines 661-664 tell 3.5 medium by its 147,456 = 384^2 positions), dual attention
    in blocks 0-12 and RMS QK-norm (lines 295-299; ``transformer_sd3.py`` line 135), joint attention over T5's 4096,
    pooled CLIP-L + CLIP-G 2048, 16 latent channels, patch 2. Counts: 2,243,171,520 parameters, 2,469,663,936 with
    the 384^2 x 1536 position table the checkpoint stores (a persistent buffer): Stability's "2.5B". VAE 83,819,683
    (16 latent channels, no quant convolutions, shift 0.0609 / scale 1.5305: the same script, lines 331-339), CLIP
    ViT-L with projection 123,650,304, OpenCLIP ViT-bigG with projection 694,659,840, T5-XXL 4,762,310,656."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    )
    vae = kl_vae((128, 256, 512, 512), 16, flow=True)
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5305)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": clip_l(True, vocab_size),
        "text_encoder_2": clip_g(vocab_size),
        "text_encoder_3": t5_encoder(),
    }


def parameter_count(module, buffers: bool = False) -> int:
    """Parameters of ``module`` (``buffers``: everything its state dict stores, persistent buffers included)."""
    if buffers:
        return sum(t.numel() for t in module.state_dict().values())
    return sum(p.numel() for p in module.parameters())
