"""The `ip_adapter` method on a tiny U-Net: diffusers' ImageProjection as a side tower and its
IPAdapterAttnProcessor2_0 in every cross-attention layer, the image embeddings passed per call through
``vp.conditioning``; the exported tensors are what diffusers' loader builds, the SD 1.5 count, bad inputs in one
line."""

from __future__ import annotations

import pytest
import torch
from tiny_models import assert_same_state, tiny_unet, tiny_vit

import visionpeft as vp
from visionpeft.adapter import methods_of
from visionpeft.errors import CheckpointError, ConfigError, DataError, IncompatibleMethodError
from visionpeft.methods.ip_adapter import released_layout_options

DIM = 12  # the image encoder's projection_dim in these tests
LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
TEXT = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
STEPS = torch.tensor([10, 500])
EMBEDS = torch.randn(2, DIM, generator=torch.Generator().manual_seed(2))


def _run(unet, embeds=EMBEDS, latents=LATENTS, text=TEXT, steps=STEPS):
    with vp.conditioning(unet, ip_image_embeds=embeds):
        return unet(latents, steps, encoder_hidden_states=text).sample


def _plain(unet=None):
    unet = tiny_unet() if unet is None else unet
    return unet(LATENTS, STEPS, encoder_hidden_states=TEXT).sample


def _trained(unet, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(unet):
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return unet


def _method(unet):
    return methods_of(unet)[-1]


def test_on_the_sd15_unet_it_trains_the_released_22m_in_the_released_layout():
    """SD 1.5's U-Net and h94's ViT-H/14 image encoder (projection_dim 1024): ImageProjection 1024 -> 4 x 768 + a
    LayerNorm of 768 = 3,150,336; to_k_ip / to_v_ip (768 -> width) in the 16 cross-attention layers (widths 320 x 2,
    640 x 2, 1280 x 2 down, 1280 mid, 1280 x 3, 640 x 3, 320 x 3 up; 12,480 in all) = 2 x 768 x 12,480 =
    19,169,280; 22,319,616 in all, the released ip-adapter_sd15's keys ip_adapter.1 ... ip_adapter.31."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280)
        )
    adapted = vp.attach(unet, "ip_adapter", image_embed_dim=1024)
    assert vp.count_parameters(adapted)["by_group"] == {"ip_adapter": 22_319_616}
    tensors = _method(adapted).diffusers_tensors()
    assert sum(v.numel() for k, v in tensors.items() if k.startswith("image_proj.")) == 3_150_336
    assert sum(v.numel() for k, v in tensors.items() if k.startswith("ip_adapter.")) == 19_169_280
    indices = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("ip_adapter.")})
    assert indices == list(range(1, 32, 2))
    assert released_layout_options(tensors) == {"image_embed_dim": 1024, "cross_attention_dim": 768}


def test_the_pieces_are_diffusers_and_start_from_the_layers_keys_and_values():
    """tutorial_train.py lines 313-319: to_k_ip / to_v_ip start as copies of the layer's to_k / to_v; every
    cross-attention processor (attn2) is diffusers' IPAdapterAttnProcessor2_0, self-attention ones stay."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection

    unet = vp.attach(tiny_unet(), "ip_adapter", image_embed_dim=DIM)
    assert isinstance(unet.ip_image_proj, ImageProjection)
    processors = unet.attn_processors
    for key, processor in processors.items():
        attn = unet.get_submodule(key.removesuffix(".processor"))
        if key.endswith("attn1.processor"):
            assert isinstance(processor, AttnProcessor2_0)
            continue
        assert isinstance(processor, IPAdapterAttnProcessor2_0) and processor.num_tokens == [4]
        torch.testing.assert_close(processor.to_k_ip[0].weight, attn.to_k.weight, rtol=0, atol=0)
        torch.testing.assert_close(processor.to_v_ip[0].weight, attn.to_v.weight, rtol=0, atol=0)
    names = [name for name, _ in _method(unet).named_tensors()]
    assert "ip_image_proj.image_embeds.weight" in names
    assert "down.0.attn.0.block.0.attn2.ip_adapter.to_k_ip.0.weight" in names


def _official_cross_attention(attn, hidden, text, tokens, scale):
    """tencent-ailab/IP-Adapter ip_adapter/attention_processor.py IPAttnProcessor2_0.__call__ (lines 226-313 at
    62e4af9): softmax(q k^T / sqrt(d)) v over the text, plus scale x the same over the image tokens with to_k_ip /
    to_v_ip, then to_out."""
    heads = attn.heads

    def attend(q, k, v):
        split = lambda x: x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return (weights @ v).transpose(1, 2).flatten(2)

    processor = attn.processor
    q = attn.to_q(hidden)
    out = attend(q, attn.to_k(text), attn.to_v(text))
    out = out + scale * attend(q, processor.to_k_ip[0](tokens), processor.to_v_ip[0](tokens))
    return attn.to_out[0](out)


def test_each_cross_attention_layer_adds_the_official_decoupled_attention():
    """One layer against a test-side reference of the official equations: image tokens = LayerNorm(W e + b)
    reshaped to 4 tokens (ImageProjModel, ip_adapter/ip_adapter.py lines 26-43), attention over them added with
    the scale."""
    unet = _trained(vp.attach(tiny_unet(), "ip_adapter", image_embed_dim=DIM, scale=0.6))
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    seen = {}
    attn.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(args=args, kwargs=kwargs, out=out), with_kwargs=True
    )
    _run(unet)
    hidden, text = seen["args"][0], seen["kwargs"]["encoder_hidden_states"][0]
    proj = unet.ip_image_proj
    tokens = torch.nn.functional.layer_norm(
        (EMBEDS @ proj.image_embeds.weight.T + proj.image_embeds.bias).view(2, 4, 16),
        (16,),
        proj.norm.weight,
        proj.norm.bias,
    )
    expected = _official_cross_attention(attn, hidden, text, tokens, 0.6)
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)


def test_scale_zero_is_the_base_unet_and_detach_restores_it():
    unet = _trained(vp.attach(tiny_unet(), "ip_adapter", image_embed_dim=DIM, scale=0.0))
    torch.testing.assert_close(_run(unet), _plain(), rtol=0, atol=0)
    vp.detach(unet)
    unet = _trained(vp.attach(unet, "ip_adapter", image_embed_dim=DIM))
    assert not torch.allclose(_run(unet), _plain(), atol=1e-4)
    vp.detach(unet)
    assert not hasattr(unet, "ip_image_proj")
    assert not any(isinstance(p, torch.nn.Module) for p in unet.attn_processors.values())
    assert_same_state(unet, tiny_unet())
    torch.testing.assert_close(_plain(unet), _plain(), rtol=0, atol=0)


def test_equals_diffusers_loader_on_the_exported_tensors():
    """The exported tensors loaded by diffusers' own loader (``_load_ip_adapter_weights`` with strict loading: no
    missing key) into a plain U-Net give the same output through diffusers' path (``added_cond_kwargs``
    ``image_embeds``); a batch twice the embeddings' is guidance's, the unconditional half with zero embeddings."""
    unet = _trained(vp.attach(tiny_unet(), "ip_adapter", image_embed_dim=DIM))
    flat = _method(unet).diffusers_tensors()
    state = {group: {} for group in ("image_proj", "ip_adapter")}
    for key, value in flat.items():
        group, _, rest = key.partition(".")
        state[group][rest] = value.clone()
    theirs = tiny_unet()
    theirs._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    with torch.no_grad():
        expected = theirs(LATENTS, STEPS, TEXT, added_cond_kwargs={"image_embeds": [EMBEDS[:, None]]}).sample
        torch.testing.assert_close(_run(unet), expected, rtol=1e-5, atol=1e-5)
        guided = torch.cat([torch.zeros_like(EMBEDS[:1]), EMBEDS[:1]])[:, None]
        expected = theirs(LATENTS, STEPS, TEXT, added_cond_kwargs={"image_embeds": [guided]}).sample
        torch.testing.assert_close(_run(unet, EMBEDS[:1]), expected, rtol=1e-5, atol=1e-5)
        several = torch.randn(2, 3, DIM, generator=torch.Generator().manual_seed(4))  # three reference images each
        expected = theirs(LATENTS, STEPS, TEXT, added_cond_kwargs={"image_embeds": [several]}).sample
        torch.testing.assert_close(_run(unet, several), expected, rtol=1e-5, atol=1e-5)


def test_save_load_and_the_released_layout_read_back(tmp_path):
    unet = _trained(vp.attach(tiny_unet(), "ip_adapter", image_embed_dim=DIM))
    expected = _run(unet)
    vp.save_adapter(unet, tmp_path / "vp")
    torch.testing.assert_close(_run(vp.load_adapter(tiny_unet(), tmp_path / "vp")), expected, rtol=0, atol=0)
    fresh = vp.attach(tiny_unet(), "ip_adapter", image_embed_dim=DIM)
    _method(fresh).load_diffusers_tensors(_method(unet).diffusers_tensors(), "the file")
    torch.testing.assert_close(_run(fresh), expected, rtol=0, atol=0)
    wider = vp.attach(tiny_unet(), "ip_adapter", image_embed_dim=DIM + 1)
    with pytest.raises(CheckpointError, match=r"^the file: image_proj.proj.weight has shape \(64, 12\), this U-Net"):
        _method(wider).load_diffusers_tensors(_method(unet).diffusers_tensors(), "the file")
    with pytest.raises(CheckpointError, match="lacks image_proj.norm.bias"):
        partial = {k: v for k, v in _method(unet).diffusers_tensors().items() if k != "image_proj.norm.bias"}
        _method(fresh).load_diffusers_tensors(partial, "the file")


def test_it_trains_with_gradient_checkpointing():
    """Gradients reach the image projection and every to_k_ip / to_v_ip, also when the U-Net recomputes its blocks
    in the backward pass (the attention hooks run again then)."""
    unet = vp.attach(tiny_unet(), "ip_adapter", image_embed_dim=DIM)
    unet.enable_gradient_checkpointing()
    unet.train()
    _run(unet).square().mean().backward()
    grads = {name: p.grad for name, p in vp.trainable_parameters(unet)}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_the_processors_follow_a_half_precision_unet():
    unet = vp.attach(tiny_unet().to(torch.bfloat16), "ip_adapter", image_embed_dim=DIM)
    assert {p.dtype for p in unet.ip_image_proj.parameters()} == {torch.float32}
    with torch.no_grad():
        out = _run(unet, EMBEDS, LATENTS.bfloat16(), TEXT.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_inputs_are_one_line():
    with pytest.raises(ConfigError) as err:
        vp.attach(tiny_unet(), "ip_adapter")
    assert _one_line(err).startswith("method 'ip_adapter' needs image_embed_dim")
    unet = vp.attach(tiny_unet(), "ip_adapter", image_embed_dim=DIM)
    with pytest.raises(DataError) as err:
        _run(unet, torch.randn(2, DIM + 1))
    assert _one_line(err) == (
        "the ip_image_embeds have shape (2, 13); this IP-Adapter needs (batch, 12) or (batch, images, 12): the image "
        "encoder's image_embeds"
    )
    with pytest.raises(DataError) as err:
        _run(unet, torch.randn(3, DIM))
    assert _one_line(err).startswith("3 image embeddings for a U-Net batch of 2")
    with pytest.raises(ConfigError) as err:
        _plain(unet)
    assert "run the model inside vp.conditioning(model, ip_image_embeds=...)" in _one_line(err)
    with pytest.raises(IncompatibleMethodError):
        vp.attach(tiny_vit(), "ip_adapter", image_embed_dim=DIM)
    with pytest.raises(ConfigError, match="scale"):
        vp.attach(tiny_unet(), "ip_adapter", image_embed_dim=DIM, scale=-1)


def test_a_unet_holding_diffusers_ip_adapter_is_refused():
    unet = _trained(vp.attach(tiny_unet(), "ip_adapter", image_embed_dim=DIM))
    state = {group: {} for group in ("image_proj", "ip_adapter")}
    for key, value in _method(unet).diffusers_tensors().items():
        group, _, rest = key.partition(".")
        state[group][rest] = value.clone()
    loaded = tiny_unet()
    loaded._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    with pytest.raises(IncompatibleMethodError) as err:
        vp.attach(loaded, "ip_adapter", image_embed_dim=DIM)
    assert _one_line(err) == (
        "ip_adapter cannot attach: the U-Net already holds an IP-Adapter loaded by diffusers "
        "(pipe.unload_ip_adapter() first)"
    )
