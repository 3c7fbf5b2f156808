"""Runs of every diffusion task with the objective's knobs on (tools/train.py on tiny pipelines): they train, learn,
record the knobs in the run's config and sample as they trained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import train as tool  # noqa: E402
from PIL import Image
from tiny_models import tiny_dit_pipeline, tiny_sd_pipeline

import visionpeft as vp
from visionpeft.backbones.diffusers_loading import load_pipeline
from visionpeft.cli.common import run
from visionpeft.config.diffusion_objective import DiffusionObjective
from visionpeft.data.fill50k import make_fill50k

KOHYA_STYLE = [
    "optim.snr_gamma=5.0",
    "optim.noise_offset=0.05",
    "optim.loss_type=huber",
    "optim.multires_noise_iterations=6",
    "optim.input_perturbation=0.1",
    "optim.timestep_bias_strategy=later",
    "optim.timestep_bias_multiplier=2.0",
]
ZERO_SNR = [
    "optim.prediction_type=v_prediction",
    "optim.change_prediction_type=true",
    "optim.rescale_zero_terminal_snr=true",
    "train.guidance_rescale=0.7",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("knob_runs")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    rng = np.random.default_rng(0)
    (tmp / "images").mkdir()
    for i in range(3):
        array = rng.integers(0, 80, (24, 24, 3), dtype=np.uint8)
        array[6:18, 6:18, 0] = 230
        Image.fromarray(array).save(tmp / "images" / f"{i}.png")
    return tmp


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["train/loss"] for x in lines if "train/loss" in x]


def _fixed_loss(pipe, images_dir, objective, draws=6) -> float:
    """The loss under ``objective`` on the training images over fixed draws (comparable across models)."""
    from visionpeft.data.few_images import FewImages
    from visionpeft.trainers.diffusion import DiffusionParts, diffusion_loss

    data = FewImages(images_dir, "", 16, "fixed", "a photo of sks box", center_crop=True, flip=0.0)
    pixels = torch.stack([data[i]["pixel_values"] for i in range(len(data))])
    parts = DiffusionParts.from_pipeline(pipe, objective=objective)
    prompts = ["a photo of sks box"] * len(pixels)
    with torch.no_grad():
        return float(
            np.mean(
                [
                    diffusion_loss(parts, pixels, prompts, torch.Generator().manual_seed(d), objective).item()
                    for d in range(draws)
                ]
            )
        )


@pytest.mark.slow
def test_dreambooth_lora_with_every_knob_learns_and_samples_as_it_trained(setup):
    """Kohya-style knobs plus v-prediction on an epsilon model with zero terminal SNR: the loss under that objective
    falls, the run's config records the knobs, and its validation images come from the trailing v sampler."""
    name = "knobs"
    args = [
        "configs/personalize/dreambooth_lora_sd15.yaml",
        f"model.name={setup / 'pipe'}",
        f"data.images={setup / 'images'}",
        "token=sks box",
        "data.size=16",
        "data.repeats=4",
        "data.batch_size=2",
        "optim.grad_accum=1",
        "optim.steps=24",
        "optim.lr=0.01",
        "train.eval_every=24",
        "train.validation_steps=2",
        "train.validation_images=1",
        "train.validation_prompts=[a photo of sks box]",
        f"train.output_dir={setup / 'runs'}",
        f"train.run_name={name}",
        "train.log_every=1",
        "--cpu",
        *KOHYA_STYLE,
        *ZERO_SNR,
    ]
    assert run(tool.main, args) == 0
    run_dir = setup / "runs" / name
    losses = _losses(run_dir)
    assert len(losses) == 24 and all(np.isfinite(losses))
    saved = (run_dir / "config.yaml").read_text()
    assert "rescale_zero_terminal_snr: true" in saved and "loss_type: huber" in saved
    assert len(list((run_dir / "validation").rglob("*.png"))) == 1
    objective = DiffusionObjective(
        snr_gamma=5.0,
        loss_type="huber",
        prediction_type="v_prediction",
        change_prediction_type=True,
        rescale_zero_terminal_snr=True,
    )
    lora = [("lora", {"r": 4, "alpha": 4, "targets": ["q", "k", "v", "o"]})]
    fresh = vp.attach(load_pipeline(str(setup / "pipe")), *lora)
    trained = vp.load_adapter(load_pipeline(str(setup / "pipe")), run_dir / "adapter")
    assert _fixed_loss(trained, setup / "images", objective) < _fixed_loss(fresh, setup / "images", objective)


@pytest.mark.slow
def test_control_and_class_conditional_runs_take_the_knobs(setup, tmp_path):
    make_fill50k(tmp_path / "fill", n=4, size=16, seed=0)
    common = [f"train.output_dir={tmp_path / 'runs'}", "train.log_every=1", "--cpu"]
    control = [
        "configs/control/controlnet_sd15_fill.yaml",
        f"model.name={setup / 'pipe'}",
        f"data.root={tmp_path / 'fill'}",
        "data.size=16",
        "data.batch_size=2",
        "optim.steps=3",
        "train.eval_every=3",
        "train.validation_steps=2",
        "train.validation_pairs=1",
        "method.hint_channels=[16, 32]",
        "train.run_name=control",
        "optim.debiased_estimation=true",
        "optim.loss_type=smooth_l1",
        "optim.huber_schedule=exponential",
        "optim.timestep_bias_strategy=earlier",
        "train.guidance_rescale=0.5",
        *common,
    ]
    assert run(tool.main, control) == 0
    assert all(np.isfinite(_losses(tmp_path / "runs" / "control")))
    tiny_dit_pipeline().save_pretrained(tmp_path / "dit")
    for name, colour in {"blue": (20, 40, 220), "red": (230, 30, 20)}.items():
        (tmp_path / "cls" / "train" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), colour, dtype=np.uint8)).save(
                tmp_path / "cls" / "train" / name / f"{i}.png"
            )
    dit = [
        "configs/class_conditional/difffit_dit_xl2_256.yaml",
        f"model.name={tmp_path / 'dit'}",
        f"data.root={tmp_path / 'cls'}",
        "data.size=16",
        "data.batch_size=4",
        "optim.steps=3",
        "train.eval_every=3",
        "train.validation_classes=[red]",
        "train.validation_images=1",
        "train.validation_steps=2",
        "train.guidance_scale=1",
        "train.run_name=dit",
        "optim.snr_gamma=5.0",
        "optim.multires_noise_iterations=4",
        "optim.input_perturbation=0.1",
        *common,
    ]
    assert run(tool.main, dit) == 0
    assert all(np.isfinite(_losses(tmp_path / "runs" / "dit")))


@pytest.mark.slow
def test_a_pipeline_pretrained_with_v_prediction_and_zero_snr_saves_its_sampler(tmp_path):
    """pretrain_text_to_image makes a new model: v-prediction needs no change_prediction_type, and RUN/pipeline's
    scheduler config says how it was trained (diffusers samples it right when it loads it)."""
    args = [
        "configs/pretrain/tiny_sd.yaml",
        "vae.steps=2",
        "vae.batch_size=8",
        "data.batch_size=8",
        "optim.steps=2",
        "optim.warmup_steps=1",
        "train.eval_every=2",
        "train.validation_images=1",
        "train.validation_steps=2",
        "data.options={max_per_subject: 2, circles: 20, per_texture: 4, per_photo: 4}",
        "optim.prediction_type=v_prediction",
        "optim.rescale_zero_terminal_snr=true",
        f"train.output_dir={tmp_path}",
        "train.run_name=v",
        "--cpu",
    ]
    assert run(tool.main, args) == 0
    scheduler = json.loads((tmp_path / "v" / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"]
    assert scheduler["timestep_spacing"] == "trailing"
