"""Flux and Stable Diffusion 3 as families: the backbone describes their transformers (double / single-stream and
MMDiT joint blocks) and CLIP towers, methods attach with diffusers' target lists, prompts are encoded as diffusers'
DreamBooth-LoRA scripts encode them, and one flow-matching step equals those scripts' step."""

from __future__ import annotations

import pytest
import torch
from benchmarks.script_steps import (
    FLUX_SCRIPT_TARGETS,
    flow_script_noising,
    flux_dreambooth_loss,
    flux_encode_prompt,
)
from tiny_flow_models import tiny_flux_pipeline, tiny_sd3_pipeline
from tiny_models import perturb

import visionpeft as vp
from visionpeft.adapter import backbone_of, methods_of
from visionpeft.backbones import pipeline_modules
from visionpeft.backbones.diffusers_loading import load_pipeline
from visionpeft.config.diffusion_objective import DiffusionObjective
from visionpeft.trainers.diffusion import DiffusionParts, diffusion_loss

PROMPTS = ["a photo of sks dog", "a photo of sks dog in a bucket"]
#: train_dreambooth_lora_sd3.py's default --lora_layers (lines 1251-1260)
SD3_SCRIPT_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders of the tiny Flux (with and without a guidance embedding) and SD3 pipelines (save_pretrained)."""
    tmp = tmp_path_factory.mktemp("flow")
    tiny_flux_pipeline(tmp / "tok_flux").save_pretrained(tmp / "flux")
    tiny_flux_pipeline(tmp / "tok_schnell", guidance=False).save_pretrained(tmp / "schnell")
    tiny_sd3_pipeline(tmp / "tok_sd3").save_pretrained(tmp / "sd3")
    return tmp


def test_flux_and_sd3_pipelines_are_families_with_described_blocks(saved):
    flux = vp.attach(load_pipeline(str(saved / "flux")), "lora", r=2, targets=["q", "out", "add_o"])
    backbone = backbone_of(flux)
    assert backbone.family == "diffusers_flux_pipeline" and list(backbone.towers) == ["transformer", "text_encoder"]
    double, single = backbone.towers["transformer"].blocks
    assert (double.name, single.name) == ("double.0", "single.0")
    assert set(double.branches) == {"attn", "attn_context", "ff", "ff_context"}
    assert list(single.projections) == ["attn.q", "attn.k", "attn.v", "mlp.fc1", "out"]
    names = sorted(name for method in methods_of(flux) for name, _ in method.named_tensors())
    assert names[0] == "double.0.attn.add_o.lora_A" and len(names) == 2 * 4
    assert backbone.diffusers_lora_group("transformer.transformer_blocks.0.attn.to_q") == (
        "transformer",
        "transformer_blocks.0.attn.to_q",
    )
    sd3 = vp.attach(load_pipeline(str(saved / "sd3")), "lora", r=2, targets=["o"])
    backbone = backbone_of(sd3)
    assert backbone.family == "diffusers_sd3_pipeline"
    assert list(backbone.towers) == ["transformer", "text_encoder", "text_encoder_2"]  # T5 is not described
    first, last = backbone.towers["transformer"].blocks
    assert set(first.branches) == {"attn", "attn_context", "attn2", "ff", "ff_context"}
    assert set(last.branches) == {"attn", "ff"}  # the last joint block reads the text without updating it
    assert len(vp.trainable_parameters(sd3)) == 2 * 3  # attn.o, attn2.o of block 0, attn.o of block 1


@pytest.mark.parametrize("kind, targets", [("flux", FLUX_SCRIPT_TARGETS), ("sd3", SD3_SCRIPT_TARGETS)])
def test_the_scripts_target_lists_attach_lora_and_dora(saved, kind, targets):
    for dora in (False, True):
        pipe = vp.attach(load_pipeline(str(saved / kind)), "lora", r=4, target_modules=targets, use_dora=dora)
        layers = {name.rsplit(".", 1)[0] for name, _ in vp.trainable_parameters(pipe)}
        # Flux: 12 in the double block + q / k / v of the single block; SD3: 8 in block 0 (PEFT's suffix rule
        # leaves attn2 out), 7 in block 1 (no to_add_out)
        assert len(layers) == 15
        assert all(name.startswith("transformer.") for name in layers)


@pytest.mark.parametrize("method", ["difffit", "bitfit", "full"])
@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_difffit_bitfit_and_full_attach_and_merge_exactly(saved, kind, method):
    from tiny_flow_models import sample_flow_images

    pipe = vp.attach(load_pipeline(str(saved / kind)), method)
    assert vp.trainable_parameters(pipe)
    assert all(name.startswith("transformer.") for name, _ in vp.trainable_parameters(pipe))
    perturb(pipe, std=0.05)
    expected = sample_flow_images(pipe, PROMPTS[0])
    assert abs(expected - sample_flow_images(load_pipeline(str(saved / kind)), PROMPTS[0])).max() > 1e-4
    vp.merge(pipe)
    assert abs(sample_flow_images(pipe, PROMPTS[0]) - expected).max() < 1e-5


def _flux_script_loss(pipe, scheduler, pixels, prompts, generator, knobs):
    """One step of train_dreambooth_lora_flux.py (``benchmarks.script_steps``) with the draws from one seeded
    generator in visionpeft's order, the prompts encoded in the step."""
    encoded = flux_encode_prompt(pipe, prompts, knobs["max_sequence_length"])
    return flux_dreambooth_loss(pipe, scheduler, pixels, encoded, generator, knobs)


def _sd3_script_loss(pipe, scheduler, pixels, prompts, generator, knobs):
    """One step of train_dreambooth_lora_sd3.py (58eb52c) written again from its lines, draws as in
    :func:`_flux_script_loss` (``benchmarks.script_steps.flow_script_noising``): ``encode_prompt`` (lines
    1014-1061: both CLIP encoders' ``hidden_states[-2]`` joined and zero-padded to T5's width, T5 appended along the
    tokens, both pooled outputs joined), the latents shifted and scaled (1775), noise, ``u``, timesteps, sigmas and
    noisy input (1779-1797), the transformer call (1800-1806), preconditioning (1810-1811, 1818-1821), weighting
    (1815) and the per-sample mean (1838-1842)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    clip_states, clip_pooled = [], []
    for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        clip_pooled.append(out[0])
        clip_states.append(out.hidden_states[-2])
    clip_embeds = torch.cat(clip_states, dim=-1)
    t5_ids = pipe.tokenizer_3(
        prompts,
        padding="max_length",
        max_length=knobs["max_sequence_length"],
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    t5_embeds = pipe.text_encoder_3(t5_ids)[0]
    clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
    prompt_embeds = torch.cat([clip_embeds, t5_embeds], dim=-2)
    pooled = torch.cat(clip_pooled, dim=-1)
    config = pipe.vae.config
    model_input = pipe.vae.encode(pixels).latent_dist.sample(generator)
    model_input = (model_input - config.shift_factor) * config.scaling_factor
    bsz = model_input.shape[0]
    noise, timesteps, sigmas, noisy_model_input = flow_script_noising(scheduler, model_input, generator, knobs)
    model_pred = pipe.transformer(
        hidden_states=noisy_model_input,
        timestep=timesteps,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        return_dict=False,
    )[0]
    if knobs["precondition_outputs"]:
        model_pred = model_pred * (-sigmas) + noisy_model_input
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=knobs["weighting_scheme"], sigmas=sigmas)
    target = model_input if knobs["precondition_outputs"] else noise - model_input
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(bsz, -1), 1)
    return loss.mean()


def _grads(pipe) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in vp.trainable_parameters(pipe) if p.grad is not None}
    for _, p in vp.trainable_parameters(pipe):
        p.grad = None
    return grads


CASES = [
    # (folder, options, script defaults filled in, text towers trained)
    ("flux", {}, {"weighting_scheme": "none", "guidance_scale": 3.5, "max_sequence_length": 512}, []),
    (
        "flux",
        {"weighting_scheme": "logit_normal", "guidance_scale": 1.0, "max_sequence_length": 16},
        {"weighting_scheme": "logit_normal", "guidance_scale": 1.0, "max_sequence_length": 16},
        ["text_encoder"],
    ),
    ("schnell", {"weighting_scheme": "mode"}, {"weighting_scheme": "mode", "max_sequence_length": 512}, []),
    ("sd3", {}, {"weighting_scheme": "logit_normal", "precondition_outputs": True, "max_sequence_length": 77}, []),
    (
        "sd3",
        {"weighting_scheme": "sigma_sqrt", "precondition_outputs": False},
        {"weighting_scheme": "sigma_sqrt", "precondition_outputs": False, "max_sequence_length": 77},
        ["text_encoder", "text_encoder_2"],
    ),
    (
        "sd3",
        {"weighting_scheme": "cosmap"},
        {"weighting_scheme": "cosmap", "precondition_outputs": True, "max_sequence_length": 77},
        [],
    ),
]


@pytest.mark.parametrize("folder, options, knobs, text", CASES)
def test_one_step_equals_the_flux_and_sd3_dreambooth_lora_scripts(saved, folder, options, knobs, text):
    pipe = load_pipeline(str(saved / folder))
    flux = folder != "sd3"
    transformer = {"tower": "transformer", "r": 4, "alpha": 4}
    transformer["target_modules"] = FLUX_SCRIPT_TARGETS if flux else SD3_SCRIPT_TARGETS
    text_loras = [("lora", {"tower": t, "r": 4, "alpha": 4, "targets": ["q", "k", "v", "o"]}) for t in text]
    vp.attach(pipe, [("lora", transformer), *text_loras])
    perturb(pipe)  # B = 0 would leave every A without a gradient
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    parts = DiffusionParts.from_pipeline(pipe, objective=DiffusionObjective(**options))
    assert type(parts.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    ours = diffusion_loss(parts, pixels, PROMPTS, torch.Generator().manual_seed(5))
    ours.backward()
    our_grads = _grads(pipe)
    script = _flux_script_loss if flux else _sd3_script_loss
    theirs = script(pipe, parts.scheduler, pixels, PROMPTS, torch.Generator().manual_seed(5), knobs)
    theirs.backward()
    their_grads = _grads(pipe)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert set(our_grads) == set(their_grads) and len(our_grads) > 8
    assert any(name.startswith("text_encoder") for name in our_grads) == bool(text)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=0, atol=1e-6, msg=name)


def test_a_flow_loss_is_refused_knobs_that_only_mean_something_on_a_ddpm_schedule(saved):
    from visionpeft.errors import ConfigError
    from visionpeft.trainers.diffusion_objective import check_objective

    pipe = load_pipeline(str(saved / "sd3"))
    with pytest.raises(ConfigError, match="optim.snr_gamma=5.0: min-SNR"):
        check_objective(DiffusionObjective(snr_gamma=5.0), pipe.scheduler, "sd3")
    with pytest.raises(ConfigError, match="optim.noise_offset=0.1"):
        check_objective(DiffusionObjective(noise_offset=0.1), pipe.scheduler, "sd3")
    check_objective(DiffusionObjective(weighting_scheme="cosmap"), pipe.scheduler, "sd3")


def test_flux_lora_in_the_kohya_layout_loads_through_diffusers_converter(saved, tmp_path):
    """Black Forest Labs' names with fused q / k / v (``lora_unet_double_blocks_0_img_attn_qkv``): diffusers'
    ``_convert_kohya_flux_lora_to_diffusers`` cuts the block-diagonal ``lora_up`` back into the separate LoRAs."""
    from safetensors.torch import load_file
    from tiny_flow_models import sample_flow_images

    targets = [f"transformer_blocks.0.{t}" for t in FLUX_SCRIPT_TARGETS] + ["single_transformer_blocks.0.proj_out"]
    pipe = load_pipeline(str(saved / "flux"))
    text = ("lora", {"tower": "text_encoder", "r": 2, "targets": ["q", "k", "v", "o"]})
    vp.attach(pipe, [("lora", {"r": 4, "alpha": 8, "target_modules": targets}), text])
    perturb(pipe)
    expected = sample_flow_images(pipe, PROMPTS[0])
    vp.save_adapter(pipe, tmp_path / "kohya", format="kohya")
    file = tmp_path / "kohya" / "lora_kohya.safetensors"
    state = load_file(file)
    assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 32)
    assert state["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"].shape == (96, 12)
    assert "lora_unet_single_blocks_0_linear2.lora_up.weight" in state
    assert any(key.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for key in state)
    theirs = load_pipeline(str(saved / "flux"))
    theirs.load_lora_weights(str(file))
    assert abs(sample_flow_images(theirs, PROMPTS[0]) - expected).max() < 1e-5


def test_flux_kohya_single_block_linear1_holds_each_lora_in_its_slot(saved):
    """A single-stream block's ``linear1`` is q, k, v and the MLP input side by side: each LoRA's update is its
    block of ``lora_up @ lora_down``, a projection without LoRA a zero block (real Flux's sizes, 3072 x 3 + 12288,
    are the ones diffusers' converter splits; the tiny layout's are checked here by the product)."""
    from visionpeft.checkpoint.exporters import kohya_state_dict

    pipe = load_pipeline(str(saved / "flux"))
    targets = ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_v"]
    vp.attach(pipe, "lora", r=2, alpha=2, target_modules=targets)
    perturb(pipe)
    state = kohya_state_dict(pipeline_modules(pipe))
    down = state["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    up = state["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert down.shape == (8, 32) and up.shape == (32 * 3 + 128, 8)
    assert state["lora_unet_single_blocks_0_linear1.alpha"] == 8
    delta = up @ down
    block = pipe.transformer.single_transformer_blocks[0]
    identity = torch.eye(32)
    with torch.no_grad():
        for start, layer in ((0, block.attn.to_q), (64, block.attn.to_v)):
            update = (layer(identity) - layer.base(identity)).T  # the wrapper's weight update, (out, in)
            assert update.abs().max() > 1e-3
            torch.testing.assert_close(delta[start : start + 32], update, rtol=0, atol=1e-6)
    assert delta[32:64].abs().max() == 0 and delta[96:].abs().max() == 0  # k and the MLP input have no LoRA


def test_the_flux_kohya_layout_refuses_a_module_it_cannot_name(saved, tmp_path):
    from visionpeft.errors import CheckpointError

    pipe = vp.attach(load_pipeline(str(saved / "flux")), "lora", r=2, target_modules=["x_embedder"])
    with pytest.raises(CheckpointError, match="^the kohya Flux layout has no name for transformer.x_embedder"):
        vp.save_adapter(pipe, tmp_path / "kohya", format="kohya")


def test_an_sd3_kohya_file_is_refused_in_one_line_since_diffusers_loads_none(saved, tmp_path):
    """diffusers' StableDiffusion3Pipeline.load_lora_weights converts no kohya keys: a LoRA in sd-scripts' SD3 layout
    (networks/lora_sd3.py at 48d368f: prefix lora_unet, the original MMDiT's fused joint_blocks_<i>_x_block_attn_qkv)
    loads without error and changes nothing. So format="kohya" on SD3 writes no file and says why in one line, and
    train.export=[kohya] is refused before training."""
    from tiny_flow_models import sample_flow_images

    from visionpeft.errors import CheckpointError, ConfigError
    from visionpeft.trainers.run_exports import check_exports

    theirs = load_pipeline(str(saved / "sd3"))
    before = sample_flow_images(theirs, PROMPTS[0])
    generator = torch.Generator().manual_seed(0)
    sd_scripts = {
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.randn(2, 32, generator=generator),
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.randn(96, 2, generator=generator),
        "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(2.0),
    }
    theirs.load_lora_weights(sd_scripts)
    assert abs(sample_flow_images(theirs, PROMPTS[0]) - before).max() == 0  # nothing loaded

    pipe = vp.attach(load_pipeline(str(saved / "sd3")), "lora", r=2, targets=["q", "v"])
    assert vp.can_export(pipe, "diffusers") and not vp.can_export(pipe, "kohya")
    with pytest.raises(CheckpointError) as err:
        vp.save_adapter(pipe, tmp_path / "kohya", format="kohya")
    assert str(err.value).startswith("an SD3 adapter has no kohya file diffusers loads: ") and "\n" not in str(
        err.value
    )
    assert not (tmp_path / "kohya").exists()
    with pytest.raises(ConfigError, match="^train.export names kohya, which this run cannot write: an SD3 adapter"):
        check_exports(pipeline_modules(pipe), ["kohya"])
