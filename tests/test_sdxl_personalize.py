"""tools/train.py's SDXL recipes on a tiny Stable Diffusion XL pipeline: each method trains, the saved files load
through diffusers' own SDXL loaders (and the kohya layout through diffusers' converter) with visionpeft's outputs,
and bad input is one line before anything loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import train as tool  # noqa: E402
from _run_args import train_args
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_models import sample_images, tiny_sd_pipeline, tiny_sdxl_pipeline

import visionpeft as vp
from visionpeft.backbones.diffusers_loading import load_pipeline
from visionpeft.cli import generate
from visionpeft.cli.common import run  # noqa: E402
from visionpeft.errors import ConfigError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl_personalize")
    tiny_sdxl_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "sd")
    rng = np.random.default_rng(0)
    (tmp / "images").mkdir()
    for i, shape in enumerate([(24, 20), (20, 24)]):  # non-square: the crops and original sizes differ per image
        array = rng.integers(0, 80, (*shape, 3), dtype=np.uint8)
        array[6:14, 6:14, 0] = 230
        Image.fromarray(array).save(tmp / "images" / f"{i}.png")
    return tmp


def _args(tmp, config_name, run_name, *overrides):
    return train_args(
        f"personalize/{config_name}",
        tmp / "runs",
        run_name,
        f"model.name={tmp / 'pipe'}",
        "model.vae=null",
        f"data.images={tmp / 'images'}",
        "data.repeats=2",
        "train.validation_prompts=[]",
        *overrides,
    )


def _train(tmp, config_name, run_name, *overrides):
    assert run(tool.main, _args(tmp, config_name, run_name, *overrides)) == 0
    run_dir = tmp / "runs" / run_name
    losses = [
        json.loads(x)["train/loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "train/loss" in x
    ]
    assert len(losses) == 3 and all(np.isfinite(losses))
    return run_dir


def _pipe(tmp):
    return load_pipeline(str(tmp / "pipe"))


@pytest.mark.slow
def test_dreambooth_lora_sdxl_run_with_prior_loads_in_diffusers_and_as_kohya(setup, capsys):
    prior = ["prior.enabled=true", "prior.num_images=2", "prior.sample_steps=2", f"prior.cache_dir={setup / 'cache'}"]
    run_dir = _train(setup, "dreambooth_lora_sdxl", "lora", "train_text_encoder=true", *prior)
    assert f"wrote {run_dir / 'diffusers'}" in capsys.readouterr().out
    ours = vp.load_adapter(_pipe(setup), run_dir / "adapter")
    assert {m.tower.name for m in vp.adapter.methods_of(ours)} == {"unet", "text_encoder", "text_encoder_2"}
    expected = sample_images(ours, "a photo of sks dog")
    assert np.abs(expected - sample_images(_pipe(setup), "a photo of sks dog")).max() > 1e-4  # it trained

    # save_lora_weights' SDXL layout, every group consumed by load_lora_weights(RUN_FOLDER)
    keys = load_file(run_dir / "diffusers" / "pytorch_lora_weights.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    theirs = _pipe(setup)
    theirs.load_lora_weights(str(run_dir / "diffusers"))
    assert np.abs(sample_images(theirs, "a photo of sks dog") - expected).max() < 1e-5

    # kohya / ComfyUI layout: lora_unet_, lora_te1_, lora_te2_; diffusers' converter reads it
    vp.save_adapter(ours, setup / "kohya", format="kohya")
    file = setup / "kohya" / "lora_kohya.safetensors"
    assert {k.split("_")[1] for k in load_file(file) if not k.startswith("lora_unet_")} == {"te1", "te2"}
    kohya = _pipe(setup)
    kohya.load_lora_weights(str(file))
    assert np.abs(sample_images(kohya, "a photo of sks dog") - expected).max() < 1e-5


@pytest.mark.slow
def test_textual_inversion_sdxl_run_writes_the_clip_l_clip_g_file_and_generates(setup, capsys):
    run_dir = _train(
        setup, "textual_inversion_sdxl", "ti", "token=<red-box>", "method.initializer=red", "optim.lr=0.05"
    )
    state = load_file(run_dir / "diffusers" / "learned_embeds.safetensors")
    assert sorted(state) == ["clip_g", "clip_l"] and state["clip_l"].shape == state["clip_g"].shape == (1, 16)
    ours = vp.load_adapter(_pipe(setup), run_dir / "adapter")
    theirs = _pipe(setup)
    theirs.load_textual_inversion(
        state["clip_g"], token="<red-box>", text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2
    )
    theirs.load_textual_inversion(
        state["clip_l"], token="<red-box>", text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer
    )
    prompt = "a photo of <red-box>"
    assert np.abs(sample_images(theirs, prompt) - sample_images(ours, prompt)).max() < 1e-5
    # tools/generate.py on the run's folder
    out = setup / "grid.png"
    args = ["--model", str(setup / "pipe"), "--adapter", str(run_dir), "--prompt", prompt, "--seeds", "0", "1"]
    assert run(generate.main, [*args, "--steps", "2", "--size", "16", "--device", "cpu", "--out", str(out)]) == 0
    assert f"wrote {out} (1 prompts x 2 seeds" in capsys.readouterr().out and Image.open(out).size[0] > 2 * 16


def test_generate_refuses_an_sdxl_embeddings_file_without_token(setup, capsys):
    file = setup / "clip.safetensors"
    save_file({"clip_l": torch.zeros(1, 16), "clip_g": torch.zeros(1, 16)}, file)
    args = ["--model", str(setup / "pipe"), "--adapter", str(file), "--prompt", "x", "--device", "cpu"]
    assert run(generate.main, [*args, "--out", str(setup / "never.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "holds SDXL embeddings (clip_l, clip_g) without their token" in err


@pytest.mark.slow
def test_difffit_sdxl_run_writes_a_merged_unet(setup):
    from diffusers import UNet2DConditionModel

    run_dir = _train(setup, "difffit_sdxl", "difffit")
    ours = vp.load_adapter(_pipe(setup), run_dir / "adapter")
    theirs = _pipe(setup)
    theirs.unet = UNet2DConditionModel.from_pretrained(run_dir / "merged" / "unet")
    prompt = "a photo of sks dog"
    assert np.abs(sample_images(theirs, prompt) - sample_images(ours, prompt)).max() < 1e-5


def _unet_outputs(unet) -> torch.Tensor:
    """The U-Net's noise prediction on fixed random latents, text states and added conditions (one call)."""
    generator = torch.Generator().manual_seed(0)
    latents, states = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    added = {"text_embeds": torch.randn(2, 16, generator=generator), "time_ids": torch.tensor([[16.0] * 6] * 2)}
    with torch.no_grad():
        return unet(latents, torch.tensor([500, 900]), states, added_cond_kwargs=added).sample


@pytest.mark.slow
def test_difffit_on_an_fp8_base_merges_into_the_full_precision_u_net(setup):
    """train.base_storage=fp8: merged/unet is the plain diffusers layout (every key read, none left over, fp32),
    DiffFit folded into the full-precision base the adapter is saved against: the same outputs as that base with the
    adapter (<= 1e-5). The fp8 model training ran differs from it by the rounding of its frozen fp8 weights (e4m3: 3
    mantissa bits, up to 2^-4 relative per weight), which the plain base shows as well: the same rounded layers,
    the scales within 1e-2 of 1, so the two deviations agree within a factor 2."""
    from diffusers import UNet2DConditionModel
    from torch.nn.utils import parametrize

    from visionpeft.trainers.base_storage import store_frozen_base

    run_dir = _train(setup, "difffit_sdxl", "difffit_fp8", "train.base_storage=fp8")
    merged, info = UNet2DConditionModel.from_pretrained(run_dir / "merged" / "unet", output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    base = _pipe(setup).unet
    state = load_file(run_dir / "merged" / "unet" / "diffusion_pytorch_model.safetensors")
    assert state.keys() == base.state_dict().keys() and {t.dtype for t in state.values()} == {torch.float32}

    ours = vp.load_adapter(_pipe(setup), run_dir / "adapter")
    expected = _unet_outputs(ours.unet)
    assert (expected - _unet_outputs(base)).abs().max() > 1e-5  # DiffFit trained
    torch.testing.assert_close(_unet_outputs(merged), expected, rtol=0, atol=1e-5)

    adapted_fp8 = vp.load_adapter(_pipe(setup), run_dir / "adapter")
    assert store_frozen_base([adapted_fp8.unet], "fp8") > 10  # as the trainer stored it
    stored = [name for name, layer in adapted_fp8.unet.named_modules() if parametrize.is_parametrized(layer)]
    base_fp8 = _pipe(setup).unet.requires_grad_(False)
    assert store_frozen_base([base_fp8.get_submodule(name) for name in stored], "fp8") == len(stored)
    rounding = (_unet_outputs(base_fp8) - _unet_outputs(base)).abs().max()
    deviation = (_unet_outputs(adapted_fp8.unet) - expected).abs().max()
    assert rounding > 1e-4 and rounding / 2 <= deviation <= 2 * rounding


@pytest.mark.parametrize(
    "config_name, folder, overrides, words",
    [
        ("dreambooth_lora_sdxl", "sd", [], "model.family=sdxl: this recipe is for Stable Diffusion XL pipelines"),
        ("dreambooth_lora_sd15", "pipe", [], "model.family=sd: this recipe is for Stable Diffusion 1.x / 2.x"),
        ("dreambooth_lora_sdxl", "pipe", ["data.size=15"], "data.size (15) is not a multiple of 2"),
        (
            "dreambooth_lora_sdxl",
            "pipe",
            ["method.target_modules=[down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q]"],
            "selects no module",
        ),
        ("textual_inversion_sdxl", "pipe", ["token=<|endoftext|>"], "already in"),
        ("textual_inversion_sdxl", "pipe", ["train_text_encoder=true"], "train_text_encoder=true adds a LoRA"),
    ],
)
def test_bad_input_is_one_line(setup, capsys, config_name, folder, overrides, words):
    args = _args(setup, config_name, "bad", f"model.name={setup / folder}", *overrides)
    assert run(tool.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1, err
    assert not (setup / "runs" / "bad").exists()


def test_a_token_already_in_the_second_tokenizer_is_refused(setup):
    pipe = _pipe(setup)
    pipe.tokenizer_2.add_tokens(["<only-in-two>"])
    pipe.text_encoder_2.resize_token_embeddings(len(pipe.tokenizer_2))
    with pytest.raises(ConfigError, match="token <only-in-two> is already in text_encoder_2's tokenizer"):
        vp.attach(pipe, "textual_inversion", token="<only-in-two>", initializer="red")
    assert "<only-in-two>" not in pipe.tokenizer.get_vocab()  # nothing changed on encoder 1


def test_sdxl_items_carry_their_real_crop(setup):
    from visionpeft.data.few_images import FewImages, ImageKnobs

    data = FewImages(
        setup / "images", "sks", 16, "fixed", center_crop=True, flip=0.0, knobs=ImageKnobs(micro_conditioning=True)
    )
    item = data[0]  # 20 wide, 24 high: resized to 16 x 19, centre crop 2 (round(3 / 2)) from the top
    assert item["original_size"].tolist() == [24, 20] and item["target_size"].tolist() == [16, 16]
    assert item["crop_top_left"].tolist() == [2, 0] and item["pixel_values"].shape == (3, 16, 16)
    assert torch.equal(data[1]["original_size"], torch.tensor([20, 24]))


def test_text_encoder_lr_gives_both_encoders_their_own_group(setup):
    from visionpeft.config import load_config
    from visionpeft.trainers.personalization import text_encoder_multipliers
    from visionpeft.trainers.run import build_optimizer

    config = load_config("configs/personalize/dreambooth_lora_sdxl.yaml", ["train_text_encoder=true"])
    pipe = _pipe(setup)
    towers = ["unet", "text_encoder", "text_encoder_2"]
    vp.attach(pipe, [("lora", {"tower": t, "r": 2, "targets": ["q", "v"]}) for t in towers])
    optimizer = build_optimizer(config.optim, vp.adapter.unwrap(pipe), 4, text_encoder_multipliers(config.optim))
    counts = {}
    for group in optimizer.param_groups:
        counts[round(group["lr"], 12)] = counts.get(round(group["lr"], 12), 0) + len(group["params"])
    text = 2 * 2 * 2 + 3 * 2 * 2  # encoder layers (2, 3) x q, v x (A, B)
    assert counts == {1e-4: len(vp.trainable_parameters(pipe)) - text, 5e-6: text}


def _script_optimizer(pipe, args):
    """train_dreambooth_lora_sdxl.py's optimizer (58eb52c), written again from its lines: the trained tensors of
    the U-Net and of each text encoder (1356-1360), the U-Net's group at --learning_rate, each encoder's its own
    with --adam_weight_decay_text_encoder and --text_encoder_lr (or --learning_rate) (1363-1382), AdamW's own
    weight_decay=--adam_weight_decay for the group that names none (1411-1416)."""
    unet_lora_parameters = [p for p in pipe.unet.parameters() if p.requires_grad]
    text_lora_parameters_one = [p for p in pipe.text_encoder.parameters() if p.requires_grad]
    text_lora_parameters_two = [p for p in pipe.text_encoder_2.parameters() if p.requires_grad]
    text_lr = args["text_encoder_lr"] if args["text_encoder_lr"] else args["learning_rate"]
    params_to_optimize = [
        {"params": unet_lora_parameters, "lr": args["learning_rate"]},
        {"params": text_lora_parameters_one, "weight_decay": args["adam_weight_decay_text_encoder"], "lr": text_lr},
        {"params": text_lora_parameters_two, "weight_decay": args["adam_weight_decay_text_encoder"], "lr": text_lr},
    ]
    return torch.optim.AdamW(params_to_optimize, betas=(0.9, 0.999), weight_decay=args["adam_weight_decay"])


@pytest.mark.parametrize(
    "overrides, args",
    [
        (  # the recipe: the script's defaults
            [],
            {
                "learning_rate": 1e-4,
                "text_encoder_lr": 5e-6,
                "adam_weight_decay": 1e-4,
                "adam_weight_decay_text_encoder": 1e-3,
            },
        ),
        (
            ["optim.text_encoder_lr=null", "optim.text_encoder_weight_decay=0.05", "optim.weight_decay=0.02"],
            {
                "learning_rate": 1e-4,
                "text_encoder_lr": None,
                "adam_weight_decay": 0.02,
                "adam_weight_decay_text_encoder": 0.05,
            },
        ),
    ],
)
def test_the_optimizer_groups_rates_and_decays_as_the_sdxl_dreambooth_lora_script(setup, overrides, args):
    """train_text_encoder=true through the trainer: every trained tensor gets the script's (lr, weight decay): the
    U-Net's lr and --adam_weight_decay, both encoders' --text_encoder_lr and --adam_weight_decay_text_encoder
    (optim.text_encoder_weight_decay; the recipe carries the script's 1e-3)."""
    from visionpeft.config import load_config
    from visionpeft.trainers.personalization import PersonalizationTrainer
    from visionpeft.trainers.run import build_optimizer

    args_of_run = _args(setup, "dreambooth_lora_sdxl", "groups", "train_text_encoder=true", *overrides)
    config = load_config(args_of_run[0], [a for a in args_of_run[1:] if a != "--cpu"])
    setup_of_run = PersonalizationTrainer().build(config, None, setup / "unused")
    ours = build_optimizer(
        config.optim, setup_of_run.adapted, 2, setup_of_run.lr_multipliers, setup_of_run.weight_decays
    )
    theirs = _script_optimizer(setup_of_run.state["pipeline"], args)

    def settings(optimizer):
        return {
            id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]
        }

    assert settings(ours) == settings(theirs)
    text_lr = args["text_encoder_lr"] or args["learning_rate"]
    assert set(settings(theirs).values()) == {
        (1e-4, args["adam_weight_decay"]),
        (text_lr, args["adam_weight_decay_text_encoder"]),
    }
