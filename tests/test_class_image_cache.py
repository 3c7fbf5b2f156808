"""Prior preservation's class images (visionpeft.data.class_images + trainers.personalization.class_images): generated
once per key (base weights sha256, model, prompt, count, size, sampler), reused by a second run, generated anew
when any of these change; an interrupted or damaged entry is never taken for a finished one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _run_args import train_args
from omegaconf import OmegaConf
from PIL import Image
from tiny_models import tiny_sd_pipeline

import visionpeft as vp
from visionpeft.backbones import pipeline_modules
from visionpeft.config.personalization import PersonalizationConfig
from visionpeft.data.class_images import cached_class_images, class_image_fields, class_image_key


def _fields(**changes):
    fields = class_image_fields("ab" * 32, "model", "a photo of a dog", 3, (16, 16), {"steps": 2, "seed": 0})
    return {**fields, **changes}


class Counting:
    """A stand-in generator that counts its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, index):
        self.calls.append(index)
        return Image.new("RGB", (4, 4), (index * 40, 0, 0))


def test_a_miss_generates_once_and_a_second_run_reuses(tmp_path):
    first = Counting()
    entry, reused = cached_class_images(tmp_path, _fields(), first)
    assert not reused and first.calls == [0, 1, 2]
    assert sorted(p.name for p in entry.iterdir()) == [
        "class_0000.png",
        "class_0001.png",
        "class_0002.png",
        "class_images.json",
    ]
    record = json.loads((entry / "class_images.json").read_text())
    assert record["prompt"] == "a photo of a dog" and record["files"][0] == "class_0000.png"
    second = Counting()
    assert cached_class_images(tmp_path, _fields(), second) == (entry, True) and second.calls == []


@pytest.mark.parametrize(
    "change",
    [
        {"base_weights_sha256": "cd" * 32},
        {"model": "other"},
        {"prompt": "a photo of a cat"},
        {"count": 4},
        {"width": 32},
        {"height": 8},
        {"sampler": {"steps": 3, "seed": 0}},
        {"sampler": {"steps": 2, "seed": 1}},
    ],
)
def test_any_change_is_another_entry(tmp_path, change):
    entry, _ = cached_class_images(tmp_path, _fields(), Counting())
    again = Counting()
    other, reused = cached_class_images(tmp_path, _fields(**change), again)
    assert other != entry and not reused and again.calls == list(range(_fields(**change)["count"]))
    assert class_image_key(_fields(**change)) != class_image_key(_fields())


def test_damaged_and_interrupted_entries_are_generated_again(tmp_path):
    entry, _ = cached_class_images(tmp_path, _fields(), Counting())
    (entry / "class_0001.png").unlink()  # an image deleted by hand
    regenerate = Counting()
    assert cached_class_images(tmp_path, _fields(), regenerate) == (entry, False) and regenerate.calls == [0, 1, 2]
    key = class_image_key(_fields(count=2))
    (tmp_path / f".{key}.tmp").mkdir()  # a run killed while generating
    (tmp_path / f".{key}.tmp" / "class_0000.png").write_bytes(b"half")
    entry, reused = cached_class_images(tmp_path, _fields(count=2), Counting())
    assert not reused and not (tmp_path / f".{key}.tmp").exists() and len(list(entry.glob("*.png"))) == 2


def _config(tmp_path, **prior):
    values = {
        "model": {"name": "tiny"},
        "data": {"size": 16},
        "prior": {"enabled": True, "num_images": 2, "sample_steps": 2, "cache_dir": str(tmp_path / "cache"), **prior},
        "train": {"seed": 0},
    }
    return OmegaConf.merge(OmegaConf.structured(PersonalizationConfig), values)


def _adapted_pipeline(tmp_path, seed=0):
    pipe = tiny_sd_pipeline(tmp_path / "tok", seed=seed)
    vp.attach(pipe, "lora", r=2, targets=["q", "v"])
    return pipe, pipeline_modules(pipe)


def test_the_trainers_cache_hits_and_misses(tmp_path):
    from visionpeft.trainers.personalization import class_images

    cpu = torch.device("cpu")
    pipe, adapted = _adapted_pipeline(tmp_path)
    entry, line = class_images(pipe, adapted, _config(tmp_path), cpu)
    assert line == f"class images: {entry} (generated)" and len(list(entry.glob("*.png"))) == 2
    # a second run (a new pipeline of the same weights) reuses them
    pipe, adapted = _adapted_pipeline(tmp_path)
    assert class_images(pipe, adapted, _config(tmp_path), cpu) == (entry, f"class images: {entry} (reused)")
    # other base weights, prompt, count, size or sampler settings: generated anew
    for config, seed in [
        (_config(tmp_path), 1),
        (_config(tmp_path, class_prompt="a photo of a cat"), 0),
        (_config(tmp_path, num_images=3), 0),
        (_config(tmp_path, sample_steps=3), 0),
        (OmegaConf.merge(_config(tmp_path), {"data": {"size": 8}}), 0),
        (OmegaConf.merge(_config(tmp_path), {"train": {"seed": 1}}), 0),
    ]:
        pipe, adapted = _adapted_pipeline(tmp_path, seed)
        other, line = class_images(pipe, adapted, config, cpu)
        assert other != entry and line.endswith("(generated)")
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 7


def test_class_images_are_the_base_models(tmp_path):
    """Methods are attached when the class images are drawn, at their initial state: the images are the base
    pipeline's, pixel for pixel."""
    from visionpeft.trainers.personalization import class_images

    pipe, adapted = _adapted_pipeline(tmp_path)
    entry, _ = class_images(pipe, adapted, _config(tmp_path), torch.device("cpu"))
    base = tiny_sd_pipeline(tmp_path / "tok")
    generator = torch.Generator().manual_seed(0)
    for index in range(2):
        image = base("a photo of a dog", num_inference_steps=2, generator=generator, height=16, width=16).images[0]
        np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(entry / f"class_{index:04d}.png")))


def test_your_own_class_folder_is_topped_up(tmp_path):
    from visionpeft.trainers.personalization import class_images

    own = tmp_path / "own"
    own.mkdir()
    Image.new("RGB", (16, 16)).save(own / "mine.png")
    pipe, adapted = _adapted_pipeline(tmp_path)
    folder, line = class_images(pipe, adapted, _config(tmp_path, images=str(own), num_images=2), torch.device("cpu"))
    assert folder == own and line == f"class images: {own}"
    assert sorted(p.name for p in own.iterdir()) == ["class_0001.png", "mine.png"]
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_a_second_run_reuses_the_class_images_and_trains_the_same(tmp_path):
    import train as tool

    from visionpeft.cli.common import run

    tiny_sd_pipeline(tmp_path / "tok").save_pretrained(tmp_path / "pipe")
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    outputs = []
    for name in ("first", "second"):
        args = train_args(
            "personalize/dreambooth_lora_tiny_sd",
            tmp_path / "runs",
            name,
            f"model.name={tmp_path / 'pipe'}",
            f"data.images={tmp_path / 'images'}",
            "data.repeats=2",
            "prior.enabled=true",
            "prior.num_images=2",
            "prior.sample_steps=2",
            "prior.class_prompt=a photo",
            "train.eval_every=3",
            "train.validation_prompts=[]",
        )
        assert run(tool.main, args) == 0
        run_dir = tmp_path / "runs" / name
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        outputs.append(([x["train/loss"] for x in lines if "train/loss" in x], (run_dir / "README.md").read_text()))
    (entry,) = [p for p in (tmp_path / "runs" / "class_image_cache").iterdir() if not p.name.startswith(".")]
    assert f"class images: {entry} (generated)" in outputs[0][1]
    assert f"class images: {entry} (reused)" in outputs[1][1]
    assert outputs[0][0] == outputs[1][0]  # the same class images, the same draws: the same losses
