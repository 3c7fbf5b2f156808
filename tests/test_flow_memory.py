"""The memory options on the flow-matching trainer (Flux, SD3), as the SD ones are tested: train.gradient_checkpointing
recomputes, never changes, a step (the transformer's and the CLIP encoders' checkpointing, as the personalization
trainer turns them on), and a bf16 mixed-precision run (torch's CPU autocast) trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_flow_models import tiny_flux_pipeline, tiny_sd3_pipeline
from tiny_models import perturb
from torch.utils.data import DataLoader

import visionpeft as vp
from visionpeft.config import load_config
from visionpeft.trainers.personalization import PersonalizationTrainer

PIPELINES = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow_memory")
    for family, build in PIPELINES.items():
        build(tmp / f"tok_{family}").save_pretrained(tmp / family)
    rng = np.random.default_rng(0)
    (tmp / "images").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp / "images" / f"{i}.png")
    return tmp


def _overrides(tmp, family, *more):
    return [
        f"model.name={tmp / family}",
        f"data.images={tmp / 'images'}",
        "data.size=16",
        "data.batch_size=2",
        "optim.grad_accum=1",
        "optim.max_sequence_length=16",
        "train.mixed_precision=no",
        "train.validation_prompts=[]",
        "train_text_encoder=true",
        *more,
    ]


def _step(tmp, family, checkpointing):
    """The trainer's loss on the first batch (global stream seeded 0) and its trained tensors' gradients, with
    ``train.gradient_checkpointing`` as given; and how many blocks ran through the transformer's checkpoint."""
    torch.manual_seed(0)  # the LoRAs' A and the data's draws: the same in both builds
    config = load_config(
        f"configs/personalize/dreambooth_lora_{family}.yaml",
        _overrides(tmp, family, f"train.gradient_checkpointing={str(checkpointing).lower()}"),
    )
    built = PersonalizationTrainer().build(config, None, tmp / "unused")
    perturb(built.adapted)  # LoRA B = 0 would leave every A without a gradient
    vp.set_train_mode(built.adapted, True)
    transformer = built.adapted.transformer
    calls = []
    checkpoint = transformer._gradient_checkpointing_func
    transformer._gradient_checkpointing_func = lambda *args, **kwargs: calls.append(1) or checkpoint(*args, **kwargs)
    batch = next(iter(DataLoader(built.train_set, batch_size=2)))
    torch.manual_seed(0)
    loss = built.model(batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in vp.trainable_parameters(built.adapted) if p.grad is not None}
    encoders = [getattr(built.adapted, name) for name in built.adapted.text_encoders()]
    on = [transformer.is_gradient_checkpointing, *(e.is_gradient_checkpointing for e in encoders if e.training)]
    return loss.detach(), grads, len(calls), on


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_gradient_checkpointing_keeps_the_flow_step(setup, family):
    loss, grads, calls, on = _step(setup, family, False)
    checkpointed, checkpointed_grads, checkpointed_calls, checkpointed_on = _step(setup, family, True)
    assert calls == 0 and not any(on)
    # Flux: one double- and one single-stream block; SD3: two joint blocks
    assert checkpointed_calls == 2 and all(checkpointed_on) and len(checkpointed_on) > 1
    torch.testing.assert_close(checkpointed, loss, rtol=0, atol=1e-5)
    assert grads.keys() == checkpointed_grads.keys() and any(n.startswith("text_encoder") for n in grads)
    silent = {name for name, grad in grads.items() if grad.abs().max() == 0}
    assert silent <= {f"transformer.transformer_blocks.1.attn.add_q_proj.updates.main.lora_{x}" for x in "AB"}  # SD3
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_bf16_flow_run_trains(setup, family):
    """train.mixed_precision=bf16 on the CPU (torch's CPU autocast, the frozen weights stored in bf16): finite
    losses, and the LoRAs (B zero at the start) moved."""
    import train as tool
    from safetensors.torch import load_file

    from visionpeft.cli.common import run

    args = _overrides(
        setup, family, "train.mixed_precision=bf16", "optim.steps=3", "optim.lr=1e-3", "train.log_every=1"
    )
    args = [*args, f"train.output_dir={setup / 'runs'}", f"train.run_name=bf16_{family}", "--cpu"]
    assert run(tool.main, [f"configs/personalize/dreambooth_lora_{family}.yaml", *args]) == 0
    run_dir = setup / "runs" / f"bf16_{family}"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["train/loss"] for line in lines if "train/loss" in line]
    assert len(losses) == 3 and all(np.isfinite(losses))
    state = load_file(run_dir / "adapter" / "visionpeft_adapter.safetensors")
    ups = {name: tensor for name, tensor in state.items() if "lora_B" in name}
    assert ups and all(t.dtype == torch.float32 for t in ups.values())
    still = [name for name, t in ups.items() if t.abs().max() == 0]
    # every LoRA trained off its zero start, but SD3's last block's text queries (it reads the text without
    # updating it: nothing depends on them)
    assert still == ([] if family == "flux" else ["transformer.transformer_blocks.1.attn.add_q_proj.lora_B"])
