"""Tiny models built from config (never downloaded) and ways to run them on fixed inputs."""

from __future__ import annotations

import torch

VIT_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def tiny_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(**{**VIT_KW, **overrides}).eval()


def tiny_clip(
    seed: int = 0, batch_first: bool = True, vocab_size: int = 1000, context_length: int = 16
) -> torch.nn.Module:
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=context_length, vocab_size=vocab_size, width=32, heads=2, layers=2),
    )
    if not batch_first:
        model.visual.transformer.batch_first = False
        model.transformer.batch_first = False
        for blk in list(model.visual.transformer.resblocks) + list(model.transformer.resblocks):
            blk.attn.batch_first = False
    return model.eval()


def tiny_clip_timm(seed: int = 0) -> torch.nn.Module:
    """open_clip CLIP whose vision tower is a timm ViT trunk (open_clip.TimmModel)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(
        timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False, timm_pool="", timm_proj="linear"
    )
    text = CLIPTextCfg(context_length=16, vocab_size=1000, width=32, heads=2, layers=2)
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
    ).eval()


def tiny_dit(seed: int = 0, num_classes: int = 10) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    ).eval()
    for block in model.transformer_blocks[1:]:  # as in converted DiT checkpoints: one embedder, copied per block
        block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


class Case:
    """A backbone under test: a factory and a way to run it on fixed inputs."""

    def __init__(self, name, factory, run):
        self.name, self.factory, self.run = name, factory, run

    def __repr__(self) -> str:
        return self.name


def _images(n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _run_vit(model):
    return model(_images())


def _run_clip_vision(model):
    return model.encode_image(_images())


def _run_clip_timm(model):
    return model.encode_image(_images(size=224))


def _run_clip_text(model):
    tokens = torch.randint(1, 999, (2, 16), generator=torch.Generator().manual_seed(2))
    tokens[:, -1] = 999
    return model.encode_text(tokens)


def _run_unet(model):
    g = torch.Generator().manual_seed(3)
    x, enc = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    return model(x, torch.tensor([10, 500]), enc).sample


def _run_dit(model):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    return model(x, timestep=torch.tensor([10, 500]), class_labels=torch.tensor([1, 3])).sample


CASES = {
    "vit": Case("vit", tiny_vit, _run_vit),
    "vit_reg_avg": Case(
        "vit_reg_avg", lambda seed=0: tiny_vit(seed, reg_tokens=2, global_pool="avg", init_values=0.1), _run_vit
    ),
    "vit_nocls": Case(
        "vit_nocls",
        lambda seed=0: tiny_vit(seed, class_token=False, global_pool="avg", no_embed_class=True, fc_norm=True),
        _run_vit,
    ),
    "clip_timm": Case("clip_timm", tiny_clip_timm, _run_clip_timm),
    "clip_vision": Case("clip_vision", tiny_clip, _run_clip_vision),
    "clip_vision_lnd": Case("clip_vision_lnd", lambda seed=0: tiny_clip(seed, batch_first=False), _run_clip_vision),
    "clip_text": Case("clip_text", tiny_clip, _run_clip_text),
    "unet": Case("unet", tiny_unet, _run_unet),
    "dit": Case("dit", tiny_dit, _run_dit),
}


def tiny_vae():
    """A 2-level KL autoencoder: 4 latent channels at half the image size."""
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
    )


def tiny_dit_pipeline(seed: int = 0):
    """A DiTPipeline with a tiny ImageNet-shaped DiT (1000 classes + the null class, learned sigma) at 16 px."""
    from diffusers import DDIMScheduler, DiTPipeline

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    pipe = DiTPipeline(transformer=tiny_dit(seed, num_classes=1000), vae=tiny_vae(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(directory, seed: int = 0):
    """A complete Stable Diffusion pipeline with tiny U-Net, VAE and CLIP text encoder (random weights)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from visionpeft.data.clip_vocab import clip_tokenizer

    tokenizer = clip_tokenizer(directory)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=16,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(seed),
        scheduler=DDIMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_unet(
    seed: int = 0, text_dims: tuple[int, int] = (16, 16), pooled_dim: int = 16, levels: int = 2
) -> torch.nn.Module:
    """An SDXL-layout U-Net: added conditions ``text_time`` (pooled text embedding + six time ids of 8 channels
    each), linear projections in the transformers, no attention at the first level, two transformer layers at the
    second (SDXL has 1, 2, 10), cross-attention on both encoders' joined states. ``levels=3`` has SDXL's three down
    blocks (plain, cross-attention, cross-attention; widths 16, 32, 32), the layout T2I-Adapter's
    ``full_adapter_xl`` fits."""
    from diffusers import UNet2DConditionModel

    three = levels == 3
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32, 32) if three else (16, 32),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", *(("CrossAttnDownBlock2D",) if three else ())),
        up_block_types=(*(("CrossAttnUpBlock2D",) if three else ()), "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2) if three else (1, 2),
        attention_head_dim=(2, 4, 4) if three else (2, 4),
        use_linear_projection=True,
        cross_attention_dim=sum(text_dims),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=pooled_dim + 6 * 8,
    ).eval()


def tiny_sdxl_pipeline(directory, seed: int = 0, prediction_type: str = "epsilon", levels: int = 2):
    """A complete Stable Diffusion XL pipeline with random weights: the SDXL-layout U-Net (``levels``: see
    :func:`tiny_sdxl_unet`), a tiny VAE, a ``CLIPTextModel`` and a ``CLIPTextModelWithProjection`` (hidden 16,
    projection 16) over the real BPE vocabulary, tokenizer 2 padding with "!" as SDXL's does."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from visionpeft.data.clip_vocab import clip_tokenizer

    tokenizer = clip_tokenizer(directory)
    tokenizer_2 = clip_tokenizer(directory, pad_token="!")

    def text_config(layers: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=16,
            hidden_act="gelu",
        )

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(2))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(3))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=tiny_sdxl_unet(seed, levels=levels),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip_bpe(seed: int = 0) -> torch.nn.Module:
    """A tiny open_clip CLIP with the real 49,408-token BPE vocabulary (for the real tokenizer)."""
    return tiny_clip(seed, vocab_size=49408, context_length=32)


def sample_images(pipe, prompt: str):
    """Two denoising steps at 16 px with a fixed seed: a cheap, deterministic picture of a pipeline's behaviour."""
    return pipe(
        prompt, num_inference_steps=2, height=16, width=16, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images


def assert_same_state(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    """The two state dicts hold the same names and bit-identical tensors (a detached model is back to its original)."""
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def perturb(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Moves every trained tensor off its initial value by seeded normal noise of ``std``, as training would (many
    methods start at zero or the identity); returns the model."""
    import visionpeft as vp

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return model


def training_losses(model: torch.nn.Module, steps: int = 10, lr: float = 1e-2, seed: int = 0) -> list[float]:
    """The cross-entropy of ``steps`` AdamW steps on one fixed random batch of a tiny classifier's inputs (32 px,
    10 classes), training exactly what visionpeft says is trainable (``vp.set_train_mode`` on)."""
    import visionpeft as vp

    generator = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(8, 3, 32, 32, generator=generator), torch.arange(8) % 10
    optimizer = torch.optim.AdamW([p for _, p in vp.trainable_parameters(model)], lr=lr)
    vp.set_train_mode(model, True)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
