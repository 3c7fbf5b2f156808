"""Pivotal tuning's embedding handling as diffusers' advanced_diffusion_training scripts do it (issue 30): the new
tokens' random rows (``textual_inversion.initializer: null``, the scripts' ``initialize_new_tokens`` without
``--initializer_concept``) and ``retract_embeddings`` after every optimizer step (``textual_inversion.retract``),
each against this file's own code of the scripts' equations."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline
from torch.utils.data import DataLoader

import visionpeft as vp
from visionpeft.adapter import methods_of
from visionpeft.backbones import pipeline_modules
from visionpeft.config.sections import OptimConfig
from visionpeft.trainers.loop import Loop, LoopConfig, make_accelerator
from visionpeft.trainers.run import build_optimizer

# The scripts: diffusers 58eb52c, examples/advanced_diffusion_training/train_dreambooth_lora_sdxl_advanced.py
# (TokenEmbeddingsHandler.initialize_new_tokens lines 916-962, retract_embeddings lines 996-1021, called after every
# optimizer step of a --train_text_encoder_ti run, lines 2333-2339); train_dreambooth_lora_sd15_advanced.py holds the
# same code (lines 750-798, 831-857, 1848-1854).


def script_new_rows(text_encoder, tokenizer, tokens: list[str], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``initialize_new_tokens`` (sdxl lines 925-955): add the tokens, ``resize_token_embeddings``, take the resized
    table's std, set the new rows to ``randn(k, hidden_size) * std``. Returns (rows, std). Changes its arguments.

    The global generator is seeded with ``seed`` right before the draw (transformers' mean resizing draws from it
    too, so the state the script's draw sees depends on the transformers version)."""
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    text_encoder.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(tokens)
    module = text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder
    table = module.embeddings.token_embedding.weight.data
    std = table.std()
    torch.manual_seed(seed)
    table[ids] = torch.randn(len(ids), module.config.hidden_size).to(table.device).to(table.dtype) * std
    return table[ids].clone(), std


def script_retract(table: torch.Tensor, original: torch.Tensor, new_ids: list[int], std: torch.Tensor) -> None:
    """``retract_embeddings`` (sdxl lines 996-1021) on one table: every other row back to the original, the new rows
    times ``(std / their std) ** 0.1``."""
    no_updates = torch.ones(table.shape[0], dtype=torch.bool)
    no_updates[new_ids] = False
    table[no_updates] = original[no_updates]
    new = table[~no_updates]
    table[~no_updates] = new * (std / new.std()) ** 0.1


def test_random_rows_are_the_scripts_draw_times_the_tables_std(tmp_path):
    """Same generator state, same rows up to the std: the script's (its resized table, new rows included) is the
    vocabulary's within 1e-4 of itself, and the rows differ by that ratio alone."""
    pipe = tiny_sd_pipeline(tmp_path / "tok")
    encoder, tokenizer = copy.deepcopy(pipe.text_encoder), copy.deepcopy(pipe.tokenizer)
    vocabulary_std = pipe.text_encoder.get_input_embeddings().weight.std()
    torch.manual_seed(7)
    vp.attach(pipe, "textual_inversion", token="<s0>", initializer=None, num_vectors=2)
    ours = pipe.text_encoder.get_input_embeddings().new.detach()
    theirs, script_std = script_new_rows(encoder, tokenizer, ["<s0>", "<s0>_1"], seed=7)
    ratio = (script_std / vocabulary_std).item()
    assert abs(ratio - 1) < 1e-4
    torch.testing.assert_close(ours * ratio, theirs, rtol=1e-6, atol=0)
    assert ours.shape == (2, 16) and not torch.equal(ours[0], ours[1])


def test_sdxl_draws_one_encoder_after_the_other(tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path / "tok")
    stds = [
        pipe.text_encoder.get_input_embeddings().weight.std(),
        pipe.text_encoder_2.get_input_embeddings().weight.std(),
    ]
    torch.manual_seed(3)
    vp.attach(pipe, "textual_inversion", token="<s0>", initializer=None, num_vectors=2)
    torch.manual_seed(3)
    for encoder, std in zip((pipe.text_encoder, pipe.text_encoder_2), stds):
        rows = torch.randn(2, encoder.config.hidden_size) * std  # the script's loop over the encoders, in order
        assert torch.equal(encoder.get_input_embeddings().new.detach(), rows)


def prompt_loss(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """A loss that reads the new rows: the text encoder's last hidden states (of prompts holding the token) along
    one fixed direction."""
    direction = torch.linspace(-1, 1, text_encoder.config.hidden_size)
    return (text_encoder(ids)[0] * direction).mean()


class PromptLoss:
    metric = "none"

    def __init__(self, text_encoder) -> None:
        self.text_encoder = text_encoder

    def loss(self, model, ids: torch.Tensor) -> torch.Tensor:
        return prompt_loss(self.text_encoder, ids)

    def evaluate(self, model, accelerator) -> dict[str, float]:
        return {}


@pytest.mark.parametrize("fraction", [None, 0.5])
def test_retract_after_every_step_is_the_scripts(tmp_path, fraction):
    """Four loop steps of AdamW with retract equal the script's loop (step, then retract_embeddings on the resized
    table) from the same rows; with train_fraction 0.5 the last two steps only retract (the script's pivot sets the
    text encoder's lr to 0 and keeps retracting). The frozen table never changes."""
    pipe = tiny_sd_pipeline(tmp_path / "tok")
    reference_encoder, tokenizer = copy.deepcopy(pipe.text_encoder), copy.deepcopy(pipe.tokenizer)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    adapted = pipeline_modules(pipe)
    vp.attach(pipe, "textual_inversion", token="<s0>", initializer=None, num_vectors=2, retract=True)
    start = pipe.text_encoder.get_input_embeddings().new.detach().clone()
    ids = pipe.tokenizer(["a photo of <s0>", "<s0> on a table"], padding="max_length", return_tensors="pt").input_ids
    optim = OmegaConf.merge(
        OmegaConf.structured(OptimConfig),
        {"lr": 0.05, "weight_decay": 0.0, "train_fraction": {"textual_inversion": fraction} if fraction else {}},
    )
    cfg = LoopConfig(steps=4, schedule="constant", log_every=100)
    (tmp_path / "run").mkdir()
    loop = Loop(
        adapted,
        PromptLoss(pipe.text_encoder),
        build_optimizer(optim, adapted, 2),
        DataLoader(ids, batch_size=2),
        tmp_path / "run",
        cfg,
        make_accelerator(cfg, cpu=True),
        select_best=False,
    )
    loop.fit()
    ours = pipe.text_encoder.get_input_embeddings()

    _, script_std = script_new_rows(reference_encoder, tokenizer, ["<s0>", "<s0>_1"], seed=0)
    embedding = reference_encoder.get_input_embeddings()
    new_ids = tokenizer.convert_tokens_to_ids(["<s0>", "<s0>_1"])
    embedding.weight.data[new_ids] = start  # the draw is tested above; the scripts' loop from the same rows
    original = embedding.weight.data.clone()
    reference_encoder.requires_grad_(False)
    embedding.weight.requires_grad_(True)
    optimizer = torch.optim.AdamW([embedding.weight], lr=0.05, weight_decay=0.0)
    for step in range(4):
        if fraction is None or step < 4 * fraction:
            prompt_loss(reference_encoder, ids).backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            script_retract(embedding.weight.data, original, new_ids, script_std)
    torch.testing.assert_close(ours.new.detach(), embedding.weight.data[new_ids], rtol=1e-5, atol=1e-7)
    assert torch.equal(ours.base.weight, table)
    moved = (ours.new.detach() - start).abs().max()
    assert moved > 1e-3  # the steps did something the comparison can see


def test_retract_off_leaves_the_rows_to_the_optimizer(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path / "tok")
    vp.attach(pipe, "textual_inversion", token="<s0>", initializer=None)
    rows = pipe.text_encoder.get_input_embeddings().new.detach().clone()
    (method,) = methods_of(pipe)
    method.after_optimizer_step()
    assert torch.equal(pipe.text_encoder.get_input_embeddings().new.detach(), rows)
    method.config.retract = True
    method.after_optimizer_step()
    std = pipe.text_encoder.get_input_embeddings().table_std
    assert torch.equal(pipe.text_encoder.get_input_embeddings().new.detach(), rows * (std / rows.std()) ** 0.1)
