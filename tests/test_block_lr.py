"""optim.block_lr (issue 30): sd-scripts' per-block U-Net learning-rate weights on canonical U-Net places, wired
through the personalization trainer; bad keys one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny_models import tiny_sd_pipeline

import visionpeft as vp
from visionpeft.config import load_config
from visionpeft.errors import ConfigError
from visionpeft.trainers.block_rates import block_lr_multipliers
from visionpeft.trainers.run import build_optimizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("block_lr")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    (tmp / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp / "images" / f"{i}.png")
    return tmp


def config_of(folders, block_lr: str, *more: str):
    return load_config(
        "configs/personalize/dreambooth_lora_tiny_sd.yaml",
        [
            f"model.name={folders / 'pipe'}",
            f"data.images={folders / 'images'}",
            "data.size=16",
            "method.targets=[q, v, conv1]",
            f"optim.block_lr={block_lr}",
            *more,
        ],
    )


def test_the_most_specific_place_sets_each_tensor_rate_through_the_trainer(folders):
    """{down: 0.5, down.0.attn: 2, mid.resnet: 0, up.1: 3}: down_blocks.0's attentions at 2 lr (its resnets and
    down_blocks.1 at 0.5), the mid block's resnets frozen (its attention at lr), up_blocks.1 at 3 lr, up_blocks.0 at
    lr and the text encoder's LoRA at text_encoder_lr (0.1 lr) as before."""
    from visionpeft.trainers.personalization import PersonalizationTrainer

    config = config_of(
        folders,
        "{down: 0.5, down.0.attn: 2, mid.resnet: 0, up.1: 3}",
        "train_text_encoder=true",
        "optim.text_encoder_lr=1e-4",
    )
    setup = PersonalizationTrainer().build(config, None, folders / "unused")
    optimizer = build_optimizer(config.optim, setup.adapted, 8, setup.lr_multipliers)
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    seen: dict[str, set[float]] = {}
    for name, param in vp.trainable_parameters(setup.adapted):
        place = "text_encoder" if name.startswith("text_encoder") else ".".join(name.split(".")[1:4])
        place = place.replace("up_blocks.1.attentions", "up_blocks.1.x").replace("up_blocks.1.resnets", "up_blocks.1.x")
        seen.setdefault(place, set()).add(round(rate[id(param)] / 1e-3, 6))
    assert seen == {
        "down_blocks.0.resnets": {0.5},
        "down_blocks.0.attentions": {2.0},
        "down_blocks.1.resnets": {0.5},
        "mid_block.resnets.0": {0.0},
        "mid_block.resnets.1": {0.0},
        "mid_block.attentions.0": {1.0},
        "up_blocks.0.resnets": {1.0},
        "up_blocks.1.x": {3.0},
        "text_encoder": {0.1},
    }


def test_off_gives_no_multiplier(folders):
    pipe = vp.attach(tiny_sd_pipeline(folders / "tok"), "lora", r=2, targets=["q"])
    assert block_lr_multipliers({}, vp.adapter.unwrap(pipe)) == {}


def test_a_key_naming_no_block_is_one_line(folders):
    pipe = vp.attach(tiny_sd_pipeline(folders / "tok"), "lora", r=2, targets=["q"])
    with pytest.raises(ConfigError, match=r"^optim.block_lr key 'up.7' names no block of this U-Net; its stages: "):
        block_lr_multipliers({"up.7": 1.0}, vp.adapter.unwrap(pipe))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{side: 1}", "optim.block_lr key 'side' is no U-Net place"),
        ("{down: -1}", "optim.block_lr.down must be at least 0, got -1.0"),
    ],
)
def test_bad_values_are_one_line_when_the_config_loads(folders, value, message):
    with pytest.raises(ConfigError, match=message):
        config_of(folders, value)
