"""The objective's knobs in the tasks: bad combinations are one line each (at config load, or right after the
pipeline loads when the model's scheduler decides), samplers follow the training prediction type and zero terminal
SNR, guidance_rescale reaches the pipelines and tools/generate.py, and DiT's objective takes the knobs on its noise
term only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import train as tool  # noqa: E402
from PIL import Image
from tiny_models import tiny_dit_pipeline, tiny_sd_pipeline

from visionpeft.cli.common import run
from visionpeft.config import load_config
from visionpeft.config.diffusion_objective import DiffusionObjective
from visionpeft.errors import ConfigError
from visionpeft.trainers.diffusion_objective import check_objective, sampling_scheduler


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("knob_checks")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    (tmp / "images").mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(tmp / "images" / f"{i}.png")
    return tmp


def _personalization(*overrides):
    return load_config("configs/personalize/dreambooth_lora_sd15.yaml", ["data.images=/tmp", *overrides])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["optim.change_prediction_type=true"],
            "optim.change_prediction_type=true needs optim.prediction_type (epsilon or v_prediction)",
        ),
        (
            ["optim.rescale_zero_terminal_snr=true", "optim.prediction_type=epsilon"],
            "optim.rescale_zero_terminal_snr=true needs v-prediction (at zero SNR the noise is the input, so epsilon "
            "carries nothing to learn; Lin et al. 2024, sec. 3.2): set optim.prediction_type=v_prediction",
        ),
        (
            ["optim.timestep_bias_strategy=range", "optim.timestep_bias_begin=500", "optim.timestep_bias_end=500"],
            "optim.timestep_bias_begin (500) must be below optim.timestep_bias_end (500)",
        ),
        (["optim.snr_gamma=0"], "config key 'optim.snr_gamma' must be above 0, got 0.0"),
        (
            ["optim.loss_type=hubber"],
            "config key 'optim.loss_type' must be one of l2, huber, smooth_l1, got 'hubber' (did you mean 'huber'?)",
        ),
        (["optim.timestep_bias_multiplier=0"], "config key 'optim.timestep_bias_multiplier' must be above 0, got 0.0"),
        (["train.guidance_rescale=1.5"], "config key 'train.guidance_rescale' must be at most 1, got 1.5"),
    ],
)
def test_contradicting_knobs_are_one_line_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError) as info:
        _personalization(*overrides)
    assert str(info.value) == message


def test_every_diffusion_task_declares_the_knobs_in_one_place():
    """personalization, control, class_conditional and pretrain_text_to_image share the knobs (``optim``), all off
    by default except the tiny pipeline's pretraining min-SNR 5 (its recipe); guidance_rescale where samples are
    text-to-image."""
    from visionpeft.config.diffusion_objective import DiffusionOptim, objective_of
    from visionpeft.config.tasks import task_spec

    for task in ("personalization", "control", "class_conditional", "pretrain_text_to_image"):
        schema = task_spec(task).schema
        optim = schema.__dataclass_fields__["optim"].default_factory()
        assert isinstance(optim, DiffusionOptim), task
        expected = DiffusionObjective(snr_gamma=5.0) if task == "pretrain_text_to_image" else DiffusionObjective()
        assert objective_of(optim) == expected, task
        train = schema.__dataclass_fields__["train"].default_factory()
        assert hasattr(train, "guidance_rescale") == (task != "class_conditional"), task


def test_a_cubic_control_run_refuses_a_timestep_bias():
    with pytest.raises(ConfigError) as info:
        load_config(
            "configs/control/t2i_adapter_sd15_canny.yaml", ["data.root=/tmp", "optim.timestep_bias_strategy=later"]
        )
    assert str(info.value) == (
        "train.timesteps=cubic and optim.timestep_bias_strategy=later both choose the training timesteps; set one of "
        "them (train.timesteps=uniform or optim.timestep_bias_strategy=none)"
    )


def test_the_models_scheduler_decides_what_a_prediction_knob_may_do():
    from diffusers import DDIMScheduler

    epsilon = DDIMScheduler()
    v_model = DDIMScheduler(prediction_type="v_prediction")
    check_objective(DiffusionObjective(), epsilon, "m")
    check_objective(DiffusionObjective(prediction_type="epsilon"), epsilon, "m")
    check_objective(DiffusionObjective(rescale_zero_terminal_snr=True), v_model, "m")  # SD 2.x-style: no override
    check_objective(DiffusionObjective(prediction_type="v_prediction", change_prediction_type=True), epsilon, "m")
    cases = [
        (
            DiffusionObjective(prediction_type="v_prediction"),
            epsilon,
            "optim.prediction_type=v_prediction, but m was trained for epsilon (its scheduler says so); set "
            "optim.change_prediction_type=true to retrain its output for v_prediction (samples then use "
            "v_prediction too)",
        ),
        (
            DiffusionObjective(prediction_type="epsilon"),
            v_model,
            "optim.prediction_type=epsilon, but m was trained for v_prediction (its scheduler says so); set "
            "optim.change_prediction_type=true to retrain its output for epsilon (samples then use epsilon too)",
        ),
        (
            DiffusionObjective(rescale_zero_terminal_snr=True),
            epsilon,
            "optim.rescale_zero_terminal_snr=true needs v-prediction, but m predicts epsilon: set "
            "optim.prediction_type=v_prediction and optim.change_prediction_type=true (Lin et al. 2024, sec. 3.2)",
        ),
        (
            DiffusionObjective(timestep_bias_strategy="range", timestep_bias_end=1200),
            epsilon,
            "optim.timestep_bias_end (1200) is past the 1000 training timesteps of m; set it to at most 1000",
        ),
        (
            DiffusionObjective(),
            DDIMScheduler(prediction_type="sample"),
            "m's scheduler predicts sample; training supports epsilon and v_prediction (optim.prediction_type with "
            "optim.change_prediction_type=true)",
        ),
    ]
    for objective, scheduler, message in cases:
        with pytest.raises(ConfigError) as info:
            check_objective(objective, scheduler, "m")
        assert str(info.value) == message


def test_min_snr_on_a_flow_matching_model_is_one_line_naming_the_field():
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = FlowMatchEulerDiscreteScheduler()
    check_objective(DiffusionObjective(weighting_scheme="cosmap", precondition_outputs=False), flow, "sd3")
    # the flow objective follows diffusers' SD3 / Flux scripts, which have no DDPM noise or Huber knobs
    for knob in ({"loss_type": "huber"}, {"noise_offset": 0.1}, {"multires_noise_iterations": 6}):
        with pytest.raises(ConfigError, match=f"^optim.{next(iter(knob))}=.* diffusers' SD3 / Flux scripts"):
            check_objective(DiffusionObjective(**knob), flow, "sd3")
    with pytest.raises(ConfigError) as info:
        check_objective(DiffusionObjective(snr_gamma=5.0), flow, "sd3")
    assert str(info.value) == (
        "optim.snr_gamma=5.0: min-SNR-gamma weights a DDPM epsilon / v loss by its SNR, but sd3 uses "
        "FlowMatchEulerDiscreteScheduler (flow matching); its weighting schemes "
        "(diffusers.training_utils.compute_loss_weighting_for_sd3: sigma_sqrt, logit_normal, mode, cosmap) apply "
        "instead; unset optim.snr_gamma"
    )
    with pytest.raises(ConfigError, match=r"^optim\.debiased_estimation=True: debiased estimation weights"):
        check_objective(DiffusionObjective(debiased_estimation=True), flow, "sd3")
    with pytest.raises(ConfigError, match="is a flow-matching scheduler"):
        sampling_scheduler(flow, zero_terminal_snr=True)


def test_flow_matching_knobs_on_a_ddpm_model_are_one_line_naming_the_field():
    from diffusers import DDPMScheduler

    for knob in ({"weighting_scheme": "logit_normal"}, {"guidance_scale": 3.5}, {"max_sequence_length": 77}):
        with pytest.raises(ConfigError, match=f"^optim.{next(iter(knob))}=.* is a flow-matching knob"):
            check_objective(DiffusionObjective(**knob), DDPMScheduler(), "sd15")


def test_v_prediction_on_an_epsilon_model_is_one_line_before_training(setup, capsys):
    args = [
        "configs/personalize/dreambooth_lora_sd15.yaml",
        f"model.name={setup / 'pipe'}",
        f"data.images={setup / 'images'}",
        "data.size=16",
        "optim.prediction_type=v_prediction",
        f"train.output_dir={setup / 'runs'}",
        "train.run_name=refused",
        "--cpu",
    ]
    assert run(tool.main, args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: optim.prediction_type=v_prediction, but {setup / 'pipe'} was trained for epsilon (its scheduler "
        "says so); set optim.change_prediction_type=true to retrain its output for v_prediction (samples then use "
        "v_prediction too)"
    )
    assert not (setup / "runs" / "refused" / "metrics.jsonl").exists()


def test_samplers_follow_the_training_prediction_and_zero_terminal_snr():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    ddim = DDIMScheduler(steps_offset=1, clip_sample=False)
    assert sampling_scheduler(ddim) is ddim and sampling_scheduler(ddim, "epsilon") is ddim
    v = sampling_scheduler(ddim, "v_prediction")
    assert type(v) is DDIMScheduler and v.config.prediction_type == "v_prediction"
    zero = sampling_scheduler(ddim, "v_prediction", zero_terminal_snr=True)
    assert zero.config.rescale_betas_zero_snr and zero.config.timestep_spacing == "trailing"
    zero.set_timesteps(10)
    assert zero.timesteps[0] == 999  # trailing: sampling starts from the zero-SNR step
    euler = sampling_scheduler(EulerDiscreteScheduler(), zero_terminal_snr=True)
    assert type(euler) is EulerDiscreteScheduler and euler.config.rescale_betas_zero_snr
    pndm = sampling_scheduler(PNDMScheduler(), zero_terminal_snr=True)  # PNDM cannot rescale: DDIM, as diffusers' docs
    assert type(pndm) is DDIMScheduler and pndm.config.timestep_spacing == "trailing"


def test_validation_samples_use_the_runs_sampler_and_guidance_rescale(tmp_path):
    """PersonalizationObjective (training validation, eval and predict) sets the trained prediction type / zero
    terminal SNR on the pipeline's sampler and passes train.guidance_rescale to the pipeline."""
    from visionpeft.trainers.loop import LoopConfig, make_accelerator
    from visionpeft.trainers.personalization import PersonalizationObjective

    accelerator = make_accelerator(LoopConfig(), cpu=True)
    config = _personalization("train.guidance_rescale=0.7", "data.size=16", "train.validation_steps=2")
    pipe = tiny_sd_pipeline(tmp_path / "tok")
    drawn = PersonalizationObjective(pipe, config, tmp_path).draw(accelerator, ["a box"], per_prompt=1, seed=0)
    direct = pipe(
        "a box",
        num_inference_steps=2,
        height=16,
        width=16,
        guidance_rescale=0.7,
        generator=torch.Generator().manual_seed(0),
    ).images
    plain = pipe("a box", num_inference_steps=2, height=16, width=16, generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(np.asarray(drawn[0][0]), np.asarray(direct[0]))
    assert not np.array_equal(np.asarray(direct[0]), np.asarray(plain[0]))
    zero = _personalization(
        "optim.prediction_type=v_prediction",
        "optim.change_prediction_type=true",
        "optim.rescale_zero_terminal_snr=true",
    )
    PersonalizationObjective(pipe, zero, tmp_path)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    assert pipe.scheduler.config.timestep_spacing == "trailing"


def test_generate_takes_guidance_rescale_and_the_trained_sampler(setup, capsys, tmp_path):
    from visionpeft.cli.generate import main

    def grid(*extra):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.png"
        base = ["--model", str(setup / "pipe"), "--prompt", "x", "--seeds", "0", "--steps", "2", "--size", "16"]
        assert run(main, [*base, "--out", str(out), *extra]) == 0
        return np.asarray(Image.open(out))

    plain = grid()
    assert np.array_equal(grid("--guidance-rescale", "0"), plain)
    assert not np.array_equal(grid("--guidance-rescale", "0.7"), plain)
    assert not np.array_equal(grid("--prediction-type", "v_prediction", "--zero-terminal-snr"), plain)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["--model", "m", "--prompt", "x", "--guidance-rescale", "1.5"])
    assert info.value.code == 2
    assert "argument --guidance-rescale: must be a number from 0 to 1, got 1.5" in capsys.readouterr().err


def test_dit_takes_the_knobs_on_its_noise_term_and_refuses_v_prediction():
    """Min-SNR weights DiT's noise MSE only; its variational bound is unweighted (the official Min-SNR code,
    guided_diffusion/gaussian_diffusion.py lines 946-949 at 5189997)."""
    from visionpeft.trainers.class_conditional import check_dit_objective
    from visionpeft.trainers.diffusion import training_scheduler
    from visionpeft.trainers.dit_loss import class_conditional_loss

    pipe = tiny_dit_pipeline()
    scheduler = training_scheduler(pipe)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3])

    def loss(objective=None, learn_sigma=True):
        with torch.no_grad():
            return class_conditional_loss(
                pipe.transformer,
                pipe.vae,
                scheduler,
                images,
                labels,
                torch.Generator().manual_seed(1),
                learn_sigma,
                objective,
            )

    assert torch.equal(loss(DiffusionObjective()), loss())
    low_noise = {"timestep_bias_strategy": "range", "timestep_bias_end": 50, "timestep_bias_multiplier": 1e6}
    plain, min_snr = DiffusionObjective(**low_noise), DiffusionObjective(snr_gamma=5.0, **low_noise)
    vb = loss(plain) - loss(plain, learn_sigma=False)
    torch.testing.assert_close(loss(min_snr), loss(min_snr, learn_sigma=False) + vb)
    assert (loss(min_snr, learn_sigma=False) < loss(plain, learn_sigma=False)).all()  # SNR > 5: weight 5 / SNR
    with pytest.raises(ConfigError, match=r"^optim\.prediction_type=v_prediction does not apply to class_conditional"):
        check_dit_objective(DiffusionObjective(prediction_type="v_prediction", change_prediction_type=True))
