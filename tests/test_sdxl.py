"""Stable Diffusion XL as a family: the backbone sees both text towers, prompts and added conditions are encoded as
diffusers' SDXL DreamBooth-LoRA script encodes them, and one training step equals that script's step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from benchmarks.script_steps import sdxl_dreambooth_loss, sdxl_encode_prompt, sdxl_time_ids
from tiny_models import perturb, tiny_sdxl_pipeline

import visionpeft as vp
from visionpeft.adapter import backbone_of, methods_of
from visionpeft.backbones.diffusers_loading import load_pipeline
from visionpeft.trainers.diffusion import DiffusionParts, diffusion_loss, encode_prompts

PROMPTS = ["a photo of sks dog", "a photo of sks dog in a bucket"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders of the tiny SDXL pipeline (epsilon and v-prediction), written by save_pretrained."""
    tmp = tmp_path_factory.mktemp("sdxl")
    for kind in ("epsilon", "v_prediction"):
        tiny_sdxl_pipeline(tmp / "tok", prediction_type=kind).save_pretrained(tmp / kind)
    return tmp


def conditions_of(original, crop, target=(16, 16)) -> dict[str, torch.Tensor]:
    """Micro-conditioning of a batch of two items, as the data items carry it."""
    return {
        "original_size": torch.tensor([original, original[::-1]]),
        "crop_top_left": torch.tensor([crop, (0, 0)]),
        "target_size": torch.tensor([target, target]),
    }


def test_the_backbone_sees_an_sdxl_pipeline_with_both_text_towers(saved):
    pipe = load_pipeline(str(saved / "epsilon"))
    vp.attach(pipe, [("lora", {"tower": "text_encoder_2", "r": 2, "targets": ["q", "v"]})])
    backbone = backbone_of(pipe)
    assert backbone.family == "diffusers_sdxl_pipeline"
    assert list(backbone.towers) == ["unet", "text_encoder", "text_encoder_2"]
    names = [name for method in methods_of(pipe) for name, _ in method.named_tensors()]
    assert names[0] == "text_encoder_2.blocks.0.attn.q.lora_A" and len(names) == 3 * 2 * 2
    # encoder 2 keeps transformers' text_model level; diffusers' LoRA group is the component
    assert backbone.diffusers_lora_group("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj") == (
        "text_encoder_2",
        "text_model.encoder.layers.0.self_attn.q_proj",
    )
    assert backbone.diffusers_component("text_encoder_2") == ("text_encoder_2", "text_encoder_2.")
    assert backbone.describe()["addition_time_embed_dim"] == 8


def _script_loss(pipe, scheduler, pixels, prompts, conditions, seed, resolution=16):
    """One step of train_dreambooth_lora_sdxl.py (``benchmarks.script_steps``) with the draws taken in visionpeft's
    order from one seeded generator, each item's time ids from its own original size and crop, the prompts encoded
    in the step (the script's custom-prompt / --train_text_encoder path)."""
    generator = torch.Generator().manual_seed(seed)
    time_ids = sdxl_time_ids(conditions["original_size"], conditions["crop_top_left"], resolution)
    prompt_embeds, pooled = sdxl_encode_prompt(pipe, prompts)
    return sdxl_dreambooth_loss(pipe, scheduler, pixels, prompt_embeds, pooled, time_ids, generator)


def _grads(pipe) -> dict[str, torch.Tensor]:
    """The gradients of the trained tensors that got one (encoder 1's last layer feeds nothing SDXL reads)."""
    grads = {name: p.grad.clone() for name, p in vp.trainable_parameters(pipe) if p.grad is not None}
    for _, p in vp.trainable_parameters(pipe):
        p.grad = None
    return grads


@pytest.mark.parametrize(
    "kind, towers",
    [("epsilon", ["unet"]), ("v_prediction", ["unet"]), ("epsilon", ["unet", "text_encoder", "text_encoder_2"])],
)
def test_one_step_equals_the_sdxl_dreambooth_lora_script(saved, kind, towers):
    pipe = load_pipeline(str(saved / kind))
    # the script's targets: to_q/k/v/out.0 on the U-Net, q/k/v/out_proj on the encoders (--train_text_encoder)
    vp.attach(pipe, [("lora", {"tower": t, "r": 4, "alpha": 4, "targets": ["q", "k", "v", "o"]}) for t in towers])
    perturb(pipe)  # B = 0 would leave every A without a gradient
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    conditions = conditions_of((24, 20), (3, 1))
    parts = DiffusionParts.from_pipeline(pipe)
    ours = diffusion_loss(parts, pixels, PROMPTS, torch.Generator().manual_seed(5), conditions=conditions)
    ours.backward()
    our_grads = _grads(pipe)
    theirs = _script_loss(pipe, parts.scheduler, pixels, PROMPTS, conditions, 5)
    theirs.backward()
    their_grads = _grads(pipe)
    assert parts.scheduler.config.prediction_type == kind
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert set(our_grads) == set(their_grads)
    assert len(our_grads) == len(vp.trainable_parameters(pipe)) - 8 * (len(towers) == 3)  # 4 LoRAs' A and B
    for name, grad in our_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, their_grads[name], rtol=0, atol=1e-6, msg=name)


def test_prompts_pad_with_each_tokenizers_own_token_and_cache(saved):
    pipe = vp.attach(load_pipeline(str(saved / "epsilon")), "lora", r=4)  # freezes both encoders
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    parts = DiffusionParts.from_pipeline(pipe, cache_prompts=True)
    encoded = encode_prompts(parts, PROMPTS)
    assert encoded.hidden.shape == (2, 77, 32) and encoded.pooled.shape == (2, 16)
    hidden, pooled = sdxl_encode_prompt(pipe, PROMPTS)
    torch.testing.assert_close(encoded.hidden, hidden, rtol=0, atol=0)
    torch.testing.assert_close(encoded.pooled, pooled, rtol=0, atol=0)
    assert encode_prompts(parts, PROMPTS) is encoded  # frozen text side: encoded once


def test_a_wrong_crop_or_original_size_changes_the_unet_output(saved):
    pipe = load_pipeline(str(saved / "epsilon"))
    parts = DiffusionParts.from_pipeline(pipe)
    encoded = encode_prompts(parts, PROMPTS)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def output(conditions):
        extra = parts.prompts.denoiser_inputs(encoded, conditions, (16, 16))
        with torch.no_grad():
            return pipe.unet(latents, torch.tensor([10, 500]), encoded.hidden, **extra).sample

    right = output(conditions_of((24, 20), (3, 1)))
    assert torch.equal(right, output(conditions_of((24, 20), (3, 1))))
    for wrong in (conditions_of((24, 20), (0, 0)), conditions_of((512, 512), (3, 1)), None):
        assert (output(wrong) - right).abs().max() > 1e-4


def test_lora_on_unet_and_both_encoders_exports_what_diffusers_sdxl_loads(saved, tmp_path):
    from safetensors.torch import load_file
    from tiny_models import sample_images

    towers = ["unet", "text_encoder", "text_encoder_2"]
    pipe = load_pipeline(str(saved / "epsilon"))
    vp.attach(pipe, [("lora", {"tower": t, "r": 4, "alpha": 8, "targets": ["q", "k", "v", "o"]}) for t in towers])
    perturb(pipe)
    expected = sample_images(pipe, PROMPTS[0])
    vp.save_adapter(pipe, tmp_path / "diffusers", format="diffusers")
    vp.save_adapter(pipe, tmp_path / "kohya", format="kohya")
    groups = {key.split(".")[0] for key in load_file(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors")}
    assert groups == set(towers)
    kohya = load_file(tmp_path / "kohya" / "lora_kohya.safetensors")
    assert {key.split("_")[1] for key in kohya} == {"unet", "te1", "te2"}
    assert any(key.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") for key in kohya)
    for folder in (tmp_path / "diffusers", tmp_path / "kohya" / "lora_kohya.safetensors"):
        theirs = load_pipeline(str(saved / "epsilon"))
        theirs.load_lora_weights(str(folder))
        assert np.abs(sample_images(theirs, PROMPTS[0]) - expected).max() < 1e-5, folder
    # and visionpeft reads the kohya file back (import_lora through diffusers' SDXL reader)
    back = vp.load_adapter(load_pipeline(str(saved / "epsilon")), tmp_path / "kohya" / "lora_kohya.safetensors")
    assert np.abs(sample_images(back, PROMPTS[0]) - expected).max() < 1e-5


def test_gradient_checkpointing_on_the_sdxl_unet_and_encoders_keeps_loss_and_gradients(saved):
    """What ``train.gradient_checkpointing`` turns on (the U-Net's and every text encoder's) recomputes, never
    changes, the step."""
    towers = ["unet", "text_encoder", "text_encoder_2"]
    pipe = load_pipeline(str(saved / "epsilon"))
    vp.attach(pipe, [("lora", {"tower": t, "r": 2, "targets": ["q", "v"]}) for t in towers])
    perturb(pipe)
    vp.set_train_mode(pipe, True)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    parts = DiffusionParts.from_pipeline(pipe)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            pipe.text_encoder.gradient_checkpointing_enable()
            pipe.text_encoder_2.gradient_checkpointing_enable()
        loss = diffusion_loss(
            parts, pixels, PROMPTS, torch.Generator().manual_seed(2), conditions=conditions_of((24, 20), (3, 1))
        )
        loss.backward()
        results.append((loss.detach(), _grads(pipe)))
    assert pipe.unet.is_gradient_checkpointing and pipe.text_encoder_2.is_gradient_checkpointing
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=0, atol=1e-6, msg=name)
