"""Per-image captions, caption dropout / tag shuffle and aspect-ratio buckets of the personalization data
(visionpeft.data.captions / buckets), each against a test-side reference of the sd-scripts code it follows
(kohya-ss/sd-scripts at 48d368f), plus the SDXL micro-conditioning under diffusers' names and the one-line refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from visionpeft.config import load_config
from visionpeft.config.personalization import PersonalizationConfig, check_data_config
from visionpeft.data.buckets import (
    BucketBatchSampler,
    bucket_placement,
    bucket_resolutions,
    place_images,
    place_item,
    square_placement,
)
from visionpeft.data.captions import CaptionAugment, read_captions
from visionpeft.data.few_images import FewImages, ImageKnobs, image_files
from visionpeft.errors import ConfigError, DataError


def _image(path, width, height, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


# ---- references of the sd-scripts code (written here from the cited lines) ----


def ref_make_bucket_resolutions(max_reso, min_size, max_size, divisible):
    """library/model_util.py make_bucket_resolutions, lines 1316-1344."""
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos = {(int(math.sqrt(max_area) // divisible) * divisible,) * 2}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def ref_select_bucket(resos, image_width, image_height):
    """library/train_util.py BucketManager.select_bucket, the upscaling branch (lines 286-306, 343-346)."""
    aspect_ratio = image_width / image_height
    reso = (image_width, image_height)
    if reso not in set(resos):
        ar_errors = np.array([w / h for w, h in resos]) - aspect_ratio
        reso = resos[np.abs(ar_errors).argmin()]
    if aspect_ratio > reso[0] / reso[1]:
        scale = reso[1] / image_height
    else:
        scale = reso[0] / image_width
    return reso, (int(image_width * scale + 0.5), int(image_height * scale + 0.5))


def ref_process_caption(caption, keep_tokens, permutation):
    """library/train_util.py process_caption with --shuffle_caption (lines 884-888, 911, 915), the shuffle given."""
    tokens = [t.strip() for t in caption.strip().split(",")]
    fixed, flex = tokens[:keep_tokens], tokens[keep_tokens:]
    flex = [flex[i] for i in permutation]
    return ", ".join(fixed + flex)


# ---- captions ----


def test_txt_captions_beside_images_with_the_instance_prompt_as_fallback(tmp_path):
    for name in ("a", "b", "c"):
        _image(tmp_path / f"{name}.png", 12, 12)
    (tmp_path / "a.txt").write_text("photo of {}, red, square\nsecond line ignored\n")
    (tmp_path / "b.txt").write_text("  {} on grass  \n")
    data = FewImages(tmp_path, "sks box", 8, "fixed", "a photo of {}", knobs=ImageKnobs(captions=True))
    assert [data[i]["prompt"] for i in range(3)] == [
        "photo of sks box, red, square",
        "sks box on grass",
        "a photo of sks box",
    ]
    assert data.summary() == ["captions: 2 of 3 images (others: data.kind's prompt)"]
    # captions off: the .txt files are not read
    assert FewImages(tmp_path, "sks box", 8, "fixed", "a photo of {}")[0]["prompt"] == "a photo of sks box"


def test_metadata_jsonl_captions(tmp_path):
    for name in ("a", "b"):
        _image(tmp_path / f"{name}.png", 12, 12)
    lines = [{"file_name": "b.png", "text": "a drawing of {}"}, {"file_name": "a.png", "text": "{}, blue"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert read_captions(tmp_path, image_files(tmp_path)) == {"a.png": "{}, blue", "b.png": "a drawing of {}"}
    data = FewImages(tmp_path, "<t>", 8, "fixed", "x {}", knobs=ImageKnobs(captions=True))
    assert [data[i]["prompt"] for i in range(2)] == ["<t>, blue", "a drawing of <t>"]


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"orphan.txt": "x"}, "caption file {d}/orphan.txt has no image named orphan.* beside it"),
        ({"a.txt": "\n"}, "caption file {d}/a.txt is empty (its first line is the caption)"),
        (
            {"metadata.jsonl": '{"file_name": "gone.png", "text": "x"}\n'},
            "{d}/metadata.jsonl line 1: file_name gone.png does not exist in {d}",
        ),
        (
            {"metadata.jsonl": '{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png"}\n'},
            "{d}/metadata.jsonl line 2 has no text (strings)",
        ),
        (
            {"metadata.jsonl": "[1, 2]\n"},
            "{d}/metadata.jsonl line 1 is [1, 2], not a JSON object with file_name and text",
        ),
        (
            {"metadata.jsonl": '{"file_name": "a.png", "text": "x"}\n', "a.txt": "y"},
            "{d} holds both metadata.jsonl and caption files (a.txt); keep one of the two layouts",
        ),
        (
            {"metadata.jsonl": '{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": "y"}\n'},
            "{d}/metadata.jsonl line 2: a.png is listed twice",
        ),
    ],
)
def test_bad_captions_are_one_line_naming_the_file(tmp_path, files, expected):
    _image(tmp_path / "a.png", 12, 12)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError) as err:
        FewImages(tmp_path, "t", 8, knobs=ImageKnobs(captions=True))
    assert str(err.value) == expected.format(d=tmp_path)


def test_tag_shuffle_keeps_the_first_tokens_and_equals_sd_scripts():
    caption = "sks dog,  sitting , grass, blue sky,red collar"
    augment = CaptionAugment(shuffle=True, keep_tokens=2)
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        ours = augment(caption)
        torch.manual_seed(seed)
        permutation = torch.randperm(3).tolist()  # the same draw, handed to the reference
        assert ours == ref_process_caption(caption, 2, permutation)
        assert ours.startswith("sks dog, sitting, ")
        seen.add(ours)
    assert len(seen) == 6  # every order of the three shuffled tags turns up
    torch.manual_seed(5)
    first = [augment(caption) for _ in range(4)]
    torch.manual_seed(5)
    assert [augment(caption) for _ in range(4)] == first  # seeded


def test_caption_dropout_rate_and_knobs_off_draw_nothing():
    augment = CaptionAugment(dropout=0.3)
    torch.manual_seed(0)
    dropped = sum(augment("a, b") == "" for _ in range(4000)) / 4000
    assert abs(dropped - 0.3) < 0.03
    state = torch.get_rng_state()
    assert CaptionAugment()("a,  b , c") == "a,  b , c"  # untouched, not re-joined
    assert torch.equal(torch.get_rng_state(), state)
    # dropout is decided before the shuffle, as sd-scripts (lines 829-837): a dropped caption draws no permutation
    torch.manual_seed(1)
    both = CaptionAugment(dropout=0.5, shuffle=True)
    draws = [both("x, y, z") for _ in range(200)]
    assert 60 < draws.count("") < 140 and all(d == "" or sorted(d.split(", ")) == ["x", "y", "z"] for d in draws)


# ---- buckets ----


@pytest.mark.parametrize("config", [(512, 256, 1024, 64), (1024, 256, 2048, 64), (768, 320, 1536, 64), (16, 8, 32, 4)])
def test_bucket_resolutions_equal_sd_scripts(config):
    resolution, low, high, steps = config
    buckets = bucket_resolutions(resolution, low, high, steps)
    assert buckets == ref_make_bucket_resolutions((resolution, resolution), low, high, steps)
    assert all(w * h <= resolution**2 and w % steps == 0 and h % steps == 0 for w, h in buckets)


def test_sd15_bucket_set():
    buckets = bucket_resolutions(512, 256, 1024, 64)
    assert {(512, 512), (448, 576), (576, 448), (384, 640), (256, 1024), (1024, 256)} <= set(buckets)
    assert len(buckets) == 17


def test_bucket_choice_and_resize_equal_sd_scripts():
    buckets = bucket_resolutions(512, 256, 1024, 64)
    rng = np.random.default_rng(0)
    sizes = [(512, 512), (448, 576), (640, 480), (480, 640), (1920, 1080), (300, 900), (1000, 333), (77, 50)]
    sizes += [tuple(int(x) for x in rng.integers(40, 3000, 2)) for _ in range(300)]
    for width, height in sizes:
        placement = bucket_placement(buckets, width, height)
        assert (placement.bucket, placement.resized) == ref_select_bucket(buckets, width, height), (width, height)
        assert min(placement.trim) == 0 <= max(placement.trim)  # covers the bucket; crops one side only


def test_square_placement_is_the_old_resize_and_crop(tmp_path):
    """Without buckets a placed item (the path loss masks take) has the pixels of the old square transform."""
    _image(tmp_path / "a.png", 23, 31)
    old = FewImages(tmp_path, "t", 16, center_crop=True, flip=0.0)
    placed = FewImages(tmp_path, "t", 16, center_crop=True, flip=0.0, knobs=ImageKnobs(alpha_mask=True))
    assert square_placement(23, 31, 16).resized == (16, 21)
    torch.testing.assert_close(placed[0]["pixel_values"], old[0]["pixel_values"], rtol=0, atol=0)


def test_micro_conditioning_names_the_crop_of_the_resized_flipped_image(tmp_path):
    image = Image.open(_image(tmp_path / "a.png", 50, 23)).convert("RGB")
    buckets = bucket_resolutions(16, 8, 32, 4)
    placement = bucket_placement(buckets, 50, 23)
    assert placement.bucket == (20, 12) and placement.resized == (26, 12)  # aspect 2.17: 20x12 (1.67) is nearest
    lefts = set()
    for seed in range(12):
        torch.manual_seed(seed)
        flipped = bool(torch.rand(()) < 0.5)
        torch.manual_seed(seed)
        item = place_item(image, placement, 0.5, random_crop=True)
        top, left = item["crop_top_left"].tolist()
        lefts.add(left)
        assert item["original_size"].tolist() == [23, 50]  # (height, width) of the file
        assert item["target_size"].tolist() == [12, 20] == list(item["pixel_values"].shape[1:])
        assert top == 0 and 0 <= left <= 6
        resized = TF.resize(image, [12, 26], TF.InterpolationMode.BILINEAR, antialias=True)
        if flipped:
            resized = TF.hflip(resized)
        expected = TF.to_dtype(TF.to_image(TF.crop(resized, top, left, 12, 20)), torch.float32, scale=True) * 2 - 1
        torch.testing.assert_close(item["pixel_values"], expected, rtol=0, atol=1e-6)
    assert len(lefts) > 3
    centred = place_item(image, placement, 0.0, random_crop=False)
    assert centred["crop_top_left"].tolist() == [0, 6 // 2]  # sd-scripts' trim // 2


def test_bucket_batches_hold_one_bucket_and_cover_every_item_once():
    buckets = [(8, 8)] * 5 + [(12, 4)] * 3 + [(4, 12)] * 2
    sampler = BucketBatchSampler(buckets, 2, seed=3)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 3 + 2 + 1
        assert sorted(i for b in batches for i in b) == list(range(10))
        assert all(len({buckets[i] for i in b}) == 1 and 1 <= len(b) <= 2 for b in batches)
        epochs.append(batches)
        sampler.set_epoch(epoch)
        assert list(sampler) == batches  # the same for a seed and an epoch
    assert epochs[0] != epochs[1]


def test_mixed_shapes_batch_by_bucket_without_a_square_crop(tmp_path):
    shapes = [(16, 16), (17, 15), (32, 8), (64, 17), (8, 32), (15, 62)]
    for i, (w, h) in enumerate(shapes):
        _image(tmp_path / f"{i}.png", w, h, seed=i)
    knobs = ImageKnobs(buckets=(8, 32, 4))
    data = FewImages(tmp_path, "t", 16, "fixed", repeats=2, knobs=knobs)
    assert data.summary() == ["buckets: 8x32 (2), 16x16 (2), 32x8 (2)"]
    loader = DataLoader(data, batch_sampler=BucketBatchSampler(data.item_buckets(), 2, seed=0))
    shapes_seen = set()
    for batch in loader:
        shape = tuple(batch["pixel_values"].shape[2:])
        assert (batch["target_size"] == torch.tensor(shape)).all()
        shapes_seen.add(shape)
    assert shapes_seen == {(16, 16), (8, 32), (32, 8)}  # (height, width): wide and tall images stay wide and tall


def test_a_bucket_set_that_cannot_hold_an_image_is_one_line(tmp_path):
    _image(tmp_path / "ok.png", 16, 16)
    _image(tmp_path / "long.png", 90, 10)
    with pytest.raises(DataError) as err:
        FewImages(tmp_path, "t", 16, knobs=ImageKnobs(buckets=(8, 32, 4)))
    assert str(err.value) == (
        f"{tmp_path / 'long.png'} (90x10, aspect 9.00) does not fit the buckets (aspects 0.25 to 4.00): its nearest, "
        "32x8, would crop 40 pixels off it, more than data.bucket_reso_steps (4); lower data.min_bucket_reso / raise "
        "data.max_bucket_reso, or crop the image"
    )
    # too small a set: max_bucket_reso = the resolution leaves the square only, which cannot hold a 2:1 image
    (tmp_path / "long.png").unlink()
    _image(tmp_path / "wide.png", 32, 16)
    with pytest.raises(
        DataError, match="wide.png .32x16, aspect 2.00. does not fit the buckets .aspects 1.00 to 1.00."
    ):
        FewImages(tmp_path, "t", 16, knobs=ImageKnobs(buckets=(16, 16, 4)))
    # slightly beyond the extreme aspect: cropped by less than a step, accepted (sd-scripts' behaviour)
    assert place_images([(34, 8)], [tmp_path / "x.png"], 16, 8, 32, 4)[0].trim == (2, 0)


def _config(**data):
    values = {"data": {"images": None, **data}}
    return OmegaConf.merge(OmegaConf.structured(PersonalizationConfig), values)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"keep_tokens": 1}, "data.keep_tokens=1 only acts with data.shuffle_tags=true"),
        (
            {"masks": "m", "alpha_mask": True},
            "data.masks and data.alpha_mask=true both name the loss masks; set one of them",
        ),
        (
            {"buckets": True, "min_bucket_reso": 250},
            "data.min_bucket_reso (250) must be a multiple of data.bucket_reso_steps (64): 192 or 256",
        ),
        (
            {"buckets": True, "max_bucket_reso": 1000},
            "data.max_bucket_reso (1000) must be a multiple of data.bucket_reso_steps (64): 960 or 1024",
        ),
        (
            {"buckets": True, "size": 1088},
            "data.size (1088) must lie between data.min_bucket_reso (256) and data.max_bucket_reso (1024): the "
            "buckets hold data.size^2 pixels",
        ),
    ],
)
def test_contradicting_knobs_are_one_line(data, expected):
    with pytest.raises(ConfigError) as err:
        check_data_config(PersonalizationConfig, _config(**data))
    assert str(err.value) == expected
    off = {**data, "buckets": False, "keep_tokens": 0, "alpha_mask": False}
    check_data_config(PersonalizationConfig, _config(**off))  # the same values are fine once the knob is off


def test_knobs_load_from_a_config_file():
    config = load_config(
        "configs/personalize/kohya_style_lora_tiny_sd.yaml", ["data.images=.", "train.output_dir=/tmp/unused"]
    )
    assert config.data.buckets and config.data.captions == "files" and config.data.shuffle_tags
    assert config.optim.snr_gamma == 5.0 and config.optim.noise_offset == 0.05


def test_bucket_steps_off_the_models_latent_grid_are_one_line(tmp_path):
    from tiny_models import tiny_sd_pipeline

    from visionpeft.trainers.personalization import check_bucket_grid

    pipe = tiny_sd_pipeline(tmp_path / "tok")
    data = OmegaConf.create({"buckets": True, "bucket_reso_steps": 6})
    with pytest.raises(ConfigError) as err:
        check_bucket_grid(pipe, data, "tiny")
    assert str(err.value) == (
        "data.bucket_reso_steps (6) must be a multiple of 4 for tiny: its VAE scales by 2 and its U-Net halves the "
        "latents 1 times"
    )
    check_bucket_grid(pipe, OmegaConf.create({"buckets": True, "bucket_reso_steps": 8}), "tiny")


def test_the_latent_cache_tells_buckets_with_the_same_bytes_apart():
    """Two images of different shapes can hold the same bytes (a 16x16 and a 32x8 crop of one stream): each keeps
    its own latents."""
    from tiny_models import tiny_vae

    from visionpeft.trainers.diffusion import latent_distribution

    vae, cache = tiny_vae(), {}
    stream = torch.rand(3 * 256, generator=torch.Generator().manual_seed(0))
    square, wide = stream.view(1, 3, 16, 16), stream.view(1, 3, 8, 32)
    with torch.no_grad():
        assert latent_distribution(vae, square, cache).mean.shape == (1, 4, 8, 8)
        assert latent_distribution(vae, wide, cache).mean.shape == (1, 4, 4, 16)
        assert len(cache) == 2


@pytest.mark.slow
def test_kohya_style_recipe_trains_on_the_tiny_pipeline_and_is_seeded(tmp_path):
    """configs/personalize/kohya_style_lora_tiny_sd.yaml on checkpoints/tiny_sd: mixed shapes, .txt captions with
    tag shuffle and dropout, buckets, min-SNR and noise offset; two runs of one seed write the same metrics."""
    import train as tool

    from visionpeft.cli.common import run

    images = tmp_path / "images"
    images.mkdir()
    for i, (w, h) in enumerate([(32, 32), (40, 24), (48, 20), (24, 40), (30, 30)]):
        _image(images / f"{i}.png", w, h, seed=i)
        (images / f"{i}.txt").write_text(f"{{}}, handwritten, digit seven, style {i}")
    metrics = []
    for name in ("a", "b"):
        args = [
            "configs/personalize/kohya_style_lora_tiny_sd.yaml",
            f"data.images={images}",
            "data.repeats=2",
            "optim.steps=4",
            "train.eval_every=4",
            "train.validation_images=1",
            "train.validation_steps=2",
            "train.log_every=1",
            f"train.output_dir={tmp_path / 'runs'}",
            f"train.run_name={name}",
            "--cpu",
        ]
        assert run(tool.main, args) == 0
        run_dir = tmp_path / "runs" / name
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        metrics.append([{k: v for k, v in x.items() if k.startswith("train/loss")} for x in lines])
        card = (run_dir / "README.md").read_text()
        assert "captions: 5 of 5 images" in card and "buckets: 24x40 (1), 32x32 (2), 40x24 (1), 48x16 (1)" in card
        assert len(list((run_dir / "validation").rglob("*.png"))) == 1
    losses = [x["train/loss"] for x in metrics[0] if x]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert metrics[0] == metrics[1]


@pytest.mark.slow
def test_a_bucketed_run_resumes_exactly(tmp_path):
    """Stopped after one epoch and resumed, a run with buckets, tag shuffle and caption dropout repeats the
    uninterrupted one (the batch order is a function of seed and epoch; the caption draws come from the restored
    torch generator)."""
    import train as tool

    from visionpeft.cli.common import run

    images = tmp_path / "images"
    images.mkdir()
    for i, (w, h) in enumerate([(32, 32), (40, 24), (48, 20), (24, 40), (30, 30)]):
        _image(images / f"{i}.png", w, h, seed=i)
        (images / f"{i}.txt").write_text(f"{{}}, digit, style {i}, stroke {i % 2}")

    def train(name, *extra):
        args = [
            "configs/personalize/kohya_style_lora_tiny_sd.yaml",
            f"data.images={images}",
            "data.repeats=2",
            "data.caption_dropout=0.3",
            "optim.steps=8",
            "train.eval_every=8",
            "train.log_every=1",
            "train.validation_prompts=[]",
            f"train.output_dir={tmp_path / 'runs'}",
            f"train.run_name={name}",
            "--cpu",
            *extra,
        ]
        assert run(tool.main, args) == 0

    def losses(name):
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["train/loss"] for x in lines if "train/loss" in x]

    train("straight")
    train("split", "--stop-after", "1")
    assert len(losses("split")) == 4  # 4 one-bucket batches an epoch
    assert run(tool.main, ["--resume", str(tmp_path / "runs" / "split"), "--cpu"]) == 0
    assert losses("split") == losses("straight")
