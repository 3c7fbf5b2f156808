"""Textual inversion on Stable Diffusion XL against diffusers' examples/textual_inversion/textual_inversion_sdxl.py
(58eb52c), its lines written again: both tokenizers and both embedding tables get the new token as the script adds
it, one step's loss equals the script's, its gradient is the script's on the new rows (the only rows visionpeft
trains), and one AdamW step leaves both tables as the script's step and row reset leave them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_sdxl import conditions_of
from tiny_models import tiny_sdxl_pipeline

import visionpeft as vp
from visionpeft.backbones.diffusers_loading import load_pipeline
from visionpeft.config import load_config
from visionpeft.trainers.diffusion import DiffusionParts, diffusion_loss
from visionpeft.trainers.run import build_optimizer

TOKEN, INITIALIZER = "<red-box>", "red"
PROMPTS = [f"a photo of a {TOKEN}", f"a rendering of a {TOKEN}"]
RESOLUTION = 16


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl_ti")
    tiny_sdxl_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    return tmp


def _script_tokens(pipe) -> list[int]:
    """Lines 664-727: the token added to both tokenizers (676, 682), both tables resized (703-704), the new rows
    copied from the initializer's (706-713), everything but the token embeddings frozen (715-727). Returns the new
    token's id in each tokenizer."""
    ids = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        assert tokenizer.add_tokens([TOKEN]) == 1
        (initializer_token_id,) = tokenizer.encode(INITIALIZER, add_special_tokens=False)
        placeholder_token_id = tokenizer.convert_tokens_to_ids(TOKEN)
        encoder.resize_token_embeddings(len(tokenizer))
        token_embeds = encoder.get_input_embeddings().weight.data
        with torch.no_grad():
            token_embeds[placeholder_token_id] = token_embeds[initializer_token_id].clone()
        encoder.requires_grad_(False)
        encoder.get_input_embeddings().weight.requires_grad_(True)
        ids.append(placeholder_token_id)
    pipe.unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    return ids


def _script_loss(pipe, pixels, conditions, generator) -> torch.Tensor:
    """One step's loss (fp32), the draws taken in visionpeft's order from one seeded generator: the script's
    ``DDPMScheduler`` of the pipeline's scheduler config (650), the dataset's tokenization (563-577), latents
    (918-919), noise (922), timesteps (925), ``add_noise`` (930), both encoders' penultimate states and encoder 2's
    pooled output (933-939, 955-956), time ids from the item's original size and crop with (resolution, resolution)
    (940-954), the U-Net (959-961), the target (964-969), ``F.mse_loss`` (971)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latents = pipe.vae.encode(pixels).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(pixels),), generator=generator)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    ids = [
        tokenizer(
            PROMPTS, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        for tokenizer in (pipe.tokenizer, pipe.tokenizer_2)
    ]
    encoder_hidden_states_1 = pipe.text_encoder(ids[0], output_hidden_states=True).hidden_states[-2]
    encoder_output_2 = pipe.text_encoder_2(ids[1], output_hidden_states=True)
    encoder_hidden_states_2 = encoder_output_2.hidden_states[-2]
    target_size = (RESOLUTION, RESOLUTION)
    add_time_ids = torch.cat(
        [
            torch.tensor(tuple(size.tolist()) + tuple(crop.tolist()) + target_size)
            for size, crop in zip(conditions["original_size"], conditions["crop_top_left"])
        ]
    ).view(len(pixels), -1)
    added_cond_kwargs = {"text_embeds": encoder_output_2[0], "time_ids": add_time_ids.float()}
    encoder_hidden_states = torch.cat([encoder_hidden_states_1, encoder_hidden_states_2], dim=-1)
    model_pred = pipe.unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs).sample
    target = (
        noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    )
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def _script_step(pipe, ids, lr, weight_decay) -> None:
    """The optimizer over both whole tables (769-783: AdamW, the script's betas and epsilon), one step (975-977),
    then every row but the new token's set back to its value before the step (909-910, 980-991)."""
    tables = [pipe.text_encoder.get_input_embeddings().weight, pipe.text_encoder_2.get_input_embeddings().weight]
    originals = [table.data.clone() for table in tables]
    optimizer = torch.optim.AdamW(tables, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-08)
    optimizer.step()
    optimizer.zero_grad()
    for table, original, token_id in zip(tables, originals, ids):
        index_no_updates = torch.ones((len(table),), dtype=torch.bool)
        index_no_updates[token_id : token_id + 1] = False
        with torch.no_grad():
            table[index_no_updates] = original[index_no_updates]


def test_one_textual_inversion_step_equals_textual_inversion_sdxl(saved):
    ours = load_pipeline(str(saved / "pipe"))
    theirs = load_pipeline(str(saved / "pipe"))
    vp.attach(ours, "textual_inversion", token=TOKEN, initializer=INITIALIZER)
    their_ids = _script_tokens(theirs)
    assert [ours.tokenizer.convert_tokens_to_ids(TOKEN), ours.tokenizer_2.convert_tokens_to_ids(TOKEN)] == their_ids
    encoders = {
        "text_encoder": (ours.text_encoder, theirs.text_encoder),
        "text_encoder_2": (ours.text_encoder_2, theirs.text_encoder_2),
    }
    for our_encoder, their_encoder in encoders.values():
        torch.testing.assert_close(
            our_encoder.get_input_embeddings().weight, their_encoder.get_input_embeddings().weight, rtol=0, atol=0
        )
    new_rows = {name: our_encoder.get_input_embeddings().new for name, (our_encoder, _) in encoders.items()}
    assert {id(p) for _, p in vp.trainable_parameters(ours)} == {id(p) for p in new_rows.values()}  # nothing else

    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)) * 2 - 1
    conditions = conditions_of((24, 20), (3, 1))
    parts = DiffusionParts.from_pipeline(ours)
    loss = diffusion_loss(parts, pixels, PROMPTS, torch.Generator().manual_seed(5), conditions=conditions)
    loss.backward()
    their_loss = _script_loss(theirs, pixels, conditions, torch.Generator().manual_seed(5))
    their_loss.backward()
    torch.testing.assert_close(loss, their_loss, rtol=0, atol=1e-6)
    for (name, (_, their_encoder)), token_id in zip(encoders.items(), their_ids):
        their_grad = their_encoder.get_input_embeddings().weight.grad
        our_grad = new_rows[name].grad
        assert our_grad.shape == (1, 16) and our_grad.abs().max() > 0
        torch.testing.assert_close(our_grad, their_grad[token_id : token_id + 1], rtol=0, atol=1e-6, msg=name)
        assert their_grad[:token_id].abs().sum() > 0  # the prompt's other tokens: the rows the script resets

    # one optimizer step of the recipe's AdamW (lr 5e-4 x batch 4 = the script's --scale_lr, decay 1e-2)
    config = load_config("configs/personalize/textual_inversion_sdxl.yaml", [])
    optimizer = build_optimizer(config.optim, vp.adapter.unwrap(ours), config.data.batch_size)
    (group,) = optimizer.param_groups
    assert (group["lr"], group["weight_decay"]) == (5e-4 * 4, 0.01)
    before = {name: encoder.get_input_embeddings().weight.detach().clone() for name, (encoder, _) in encoders.items()}
    optimizer.step()
    _script_step(theirs, their_ids, 5e-4 * 4, 0.01)
    for name, (our_encoder, their_encoder) in encoders.items():
        after = our_encoder.get_input_embeddings().weight
        assert (after - before[name]).abs().max() > 1e-4  # the new row moved
        torch.testing.assert_close(after, their_encoder.get_input_embeddings().weight, rtol=0, atol=1e-6, msg=name)
