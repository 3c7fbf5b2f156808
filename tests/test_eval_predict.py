"""`visionpeft eval` / `predict` through the task registry: a finished tiny run of each of the six tasks is evaluated
(its metric, or one clear line), folders of other kinds and options that do not apply are one line, predict never
writes over an input or an existing file (unless --overwrite), classification predicts a CSV, segmentation masks come
with a legend, and a malformed adapter record or a 16-bit image is handled."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _classify_utils import ROOT, tiny_config, write_pretrained_vit, write_tiny_cifar10
from PIL import Image
from test_segmentation_train import small_config
from tiny_models import tiny_dit_pipeline, tiny_sd_pipeline

from visionpeft.checkpoint.folder import CONFIG_NAME
from visionpeft.cli.common import run
from visionpeft.cli.eval import main as eval_main
from visionpeft.cli.predict import main as predict_main
from visionpeft.config import load_config, save_config

CONFIGS = ROOT / "configs"


def _eval(capsys, *args) -> tuple[int, list[str], list[str]]:
    code = run(eval_main, [str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


def _predict(capsys, *args) -> tuple[int, list[str], list[str]]:
    code = run(predict_main, [str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


# ---------------------------------------------------------------- tiny finished runs, one per task (module scope)


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory):
    from visionpeft.trainers.classification import run as train

    tmp = tmp_path_factory.mktemp("cls")
    data = write_tiny_cifar10(tmp / "data", train_per_class=5, test_per_class=2)
    config = load_config(tiny_config(tmp, write_pretrained_vit(tmp / "vit.safetensors"), data), ["optim.epochs=1"])
    results = train(config, tmp / "runs" / "tiny", cpu=True)
    return tmp / "runs" / "tiny", results


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory):
    from visionpeft.trainers.segmentation import run as train

    tmp = tmp_path_factory.mktemp("seg")
    config = small_config(tmp, "optim.steps=4", "train.eval_every=4", "data.options={size: 32, n: 16}")
    results = train(config, tmp / "run", cpu=True)
    return tmp / "run", results


def _subject_images(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # a bright stroke on a dark ground
        array = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
        array[6:26, 14:18] = 255
        Image.fromarray(array).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def personalization_run(tmp_path_factory):
    """DreamBooth-LoRA for 2 steps on the embedded tiny pipeline (the one the judge knows)."""
    from visionpeft.trainers.personalization import run as train

    tmp = tmp_path_factory.mktemp("personalize")
    overrides = [
        f"model.name={ROOT / 'checkpoints' / 'tiny_sd'}",
        f"data.images={_subject_images(tmp / 'subject')}",
        "data.repeats=1",
        "data.batch_size=2",
        "optim.steps=2",
        "train.eval_every=2",
        "train.validation_steps=2",
        "train.validation_images=2",
        f"train.output_dir={tmp}",
    ]
    config = load_config(CONFIGS / "personalize" / "dreambooth_lora_tiny_sd.yaml", overrides)
    train(config, tmp / "run", cpu=True)
    return tmp / "run"


@pytest.fixture(scope="module")
def control_run(tmp_path_factory):
    from visionpeft.data.fill50k import make_fill50k
    from visionpeft.trainers.control import run as train

    tmp = tmp_path_factory.mktemp("control")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    make_fill50k(tmp / "fill", n=4, size=16, seed=0)
    overrides = [
        f"model.name={tmp / 'pipe'}",
        f"data.root={tmp / 'fill'}",
        "data.size=16",
        "data.batch_size=2",
        "optim.steps=2",
        "train.mixed_precision=no",
        "train.eval_every=2",
        "train.validation_steps=2",
        "train.validation_pairs=1",
        "method.hint_channels=[16, 32]",
        f"train.output_dir={tmp}",
    ]
    train(load_config(CONFIGS / "control" / "controlnet_sd15_fill.yaml", overrides), tmp / "run", cpu=True)
    return tmp / "run"


@pytest.fixture(scope="module")
def class_conditional_run(tmp_path_factory):
    from visionpeft.trainers.class_conditional import run as train

    tmp = tmp_path_factory.mktemp("dit")
    tiny_dit_pipeline().save_pretrained(tmp / "pipe")
    for name, colour in {"blue": (20, 40, 220), "red": (230, 30, 20)}.items():
        (tmp / "data" / "train" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), colour).save(tmp / "data" / "train" / name / f"{i}.png")
    overrides = [
        f"model.name={tmp / 'pipe'}",
        f"data.root={tmp / 'data'}",
        "data.size=null",
        "data.batch_size=4",
        "optim.steps=2",
        "train.mixed_precision=no",
        "train.validation_classes=[red, blue]",
        "train.eval_every=2",
        "train.validation_steps=2",
        "train.validation_images=1",
        f"train.output_dir={tmp}",
    ]
    train(load_config(CONFIGS / "class_conditional" / "difffit_dit_xl2_256.yaml", overrides), tmp / "run", cpu=True)
    return tmp / "run"


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    from visionpeft.demo.pretrain_text_to_image import run as train

    tmp = tmp_path_factory.mktemp("pretrain")
    overrides = [
        "model.vae_channels=[8,16]",
        "model.unet_channels=[8,16,16]",
        "model.text_width=16",
        "model.text_layers=1",
        "model.text_heads=2",
        "model.max_tokens=8",
        "vae.steps=2",
        "vae.batch_size=8",
        "data.options={max_per_subject: 2, per_texture: 2, per_photo: 2, circles: 8}",
        "data.batch_size=8",
        "optim.steps=2",
        "optim.warmup_steps=0",
        "train.eval_every=2",
        "train.validation_images=1",
        "train.validation_steps=2",
        "train.ema_decay=null",
        f"train.output_dir={tmp}",
    ]
    train(load_config(CONFIGS / "pretrain" / "tiny_sd.yaml", overrides), tmp / "run", cpu=True)
    return tmp / "run"


# ---------------------------------------------------------------- eval on every task


def _grid_size(cols: int, rows: int) -> tuple[int, int]:
    """An eval grid of tiny samples: 128 px cells (16 / 32 px enlarged), white lines between and around."""
    from visionpeft.trainers.saved_run import GRID_GAP

    return cols * 128 + (cols + 1) * GRID_GAP, rows * 128 + (rows + 1) * GRID_GAP


@pytest.mark.slow
def test_eval_of_a_classification_run_prints_top1_and_top5(classification_run, capsys):
    run_dir, results = classification_run
    code, out, err = _eval(capsys, run_dir, "--cpu")
    assert code == 0 and err == []
    assert out[-1].startswith(f"{run_dir} [last] test: top1 {100 * results['test']['top1']:.2f}%, top5 ")


@pytest.mark.slow
def test_eval_of_a_segmentation_run_prints_the_table_then_the_summary(segmentation_run, capsys):
    run_dir, results = segmentation_run
    code, out, _ = _eval(capsys, run_dir, "--cpu", "--mode", "slide")
    assert code == 0 and out[0] == "| class | IoU | Acc |" and out[-2].startswith("| aAcc |")
    assert out[-1].startswith(f"{run_dir} [last] test (slide): mIoU ")


@pytest.mark.slow
def test_eval_of_a_personalization_run_samples_and_scores_its_prompts(personalization_run, capsys, monkeypatch):
    import open_clip
    from tiny_models import tiny_clip_bpe

    from visionpeft.backbones.open_clip import clip_tokenize
    from visionpeft.metrics import clip_scores

    code, out, _ = _eval(capsys, personalization_run, "--cpu")
    assert code == 0
    folder = personalization_run / "eval" / "adapter"
    assert out[0].startswith(f"{personalization_run} [adapter] 2 images of 1 prompt(s) in {folder}: judge ")
    assert sorted(p.name for p in folder.iterdir()) == ["00_0.png", "00_1.png"]
    assert any(line.startswith("CLIP-T / CLIP-I not scored: ") for line in out[1:])

    scorer = clip_scores.ClipScorer(
        tiny_clip_bpe(), open_clip.image_transform(32, False), lambda t: clip_tokenize(t, 32)
    )
    monkeypatch.setattr(clip_scores, "local_clip_scorer", lambda spec: (scorer, "tiny"))
    code, out, _ = _eval(capsys, personalization_run, "--cpu", "--samples", "1")
    assert code == 0 and " in " + str(personalization_run / "eval" / "adapter-2") in out[0]  # the first one is kept
    assert "CLIP-T " in out[0] and "CLIP-I " in out[0] and "judge " in out[0]


@pytest.mark.slow
def test_eval_of_a_control_run_scores_held_out_fill_pairs(control_run, capsys):
    code, out, _ = _eval(capsys, control_run, "--cpu", "--samples", "2")
    assert code == 0 and len(out) == 1 and "2 held-out fill50k pairs" in out[0] and "fill_iou 0." in out[0]
    folder = control_run / "eval" / "adapter"
    assert Image.open(folder / "grid.png").size == _grid_size(3, 2)  # condition | sample | target, a row per pair
    root = Path(load_config(control_run / "config.yaml").data.root)
    training = [_pair_key(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    held = [_pair_key(line) for line in (folder / "held_out" / "metadata.jsonl").read_text().splitlines()]
    assert held and not set(held) & set(training)


def _pair_key(line: str) -> tuple:
    record = json.loads(line)
    return tuple(record["circle"]), tuple(record["fill"]), tuple(record["background"])


@pytest.mark.slow
def test_eval_of_a_class_conditional_run_writes_a_grid_per_class(class_conditional_run, capsys):
    code, out, _ = _eval(capsys, class_conditional_run, "--cpu", "--samples", "2")
    grid = class_conditional_run / "eval" / "adapter" / "grid.png"
    assert code == 0 and out == [
        f"{class_conditional_run} [adapter] 2 sample(s) of each of 2 classes: {grid} (rows: red, blue)"
    ]
    assert Image.open(grid).size == _grid_size(2, 2)


@pytest.mark.slow
def test_eval_of_a_pretraining_run_draws_its_validation_grid(pretrain_run, capsys):
    code, out, _ = _eval(capsys, pretrain_run, "--cpu")
    grid = pretrain_run / "eval" / "pipeline" / "grid.png"
    assert code == 0 and len(out) == 1 and out[0].startswith(f"{pretrain_run} [pipeline] 1 sample(s) of each of 6")
    assert Image.open(grid).size == _grid_size(1, 6)
    code, _, err = _predict(capsys, pretrain_run, "--out", pretrain_run / "p")
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: a pretrain_text_to_image run has no predictor: the run's pipeline/ folder is a")


# ---------------------------------------------------------------- predict on the generative tasks


@pytest.mark.slow
def test_predict_draws_prompts_classes_and_conditions_by_seed(
    personalization_run, control_run, class_conditional_run, tmp_path, capsys
):
    code, out, _ = _predict(
        capsys, personalization_run, "--prompt", "a sks", "--seeds", "0", "1", "--out", tmp_path / "p"
    )
    assert code == 0 and sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "00_a_sks_seed0.png",
        "00_a_sks_seed1.png",
    ]
    code, out, _ = _predict(capsys, class_conditional_run, "red", "--out", tmp_path / "c")
    assert code == 0 and [p.name for p in (tmp_path / "c").iterdir()] == ["red_seed0.png"]
    code, _, err = _predict(capsys, class_conditional_run, "green", "--out", tmp_path / "c")
    assert code == 2 and err == [
        "error: 'green' is not a class of the run (did you mean 'red'?); its classes: blue, red"
    ]
    condition = Path(load_config(control_run / "config.yaml").data.root) / "source" / "0.png"
    shutil.copy(condition, tmp_path / "outline.png")
    before = (tmp_path / "outline.png").read_bytes()
    args = [control_run, tmp_path / "outline.png", "--prompt", "red circle with blue background", "--out", tmp_path]
    code, out, _ = _predict(capsys, *args)
    assert code == 0 and Image.open(tmp_path / "outline_seed0.png").size == (16, 16)
    assert (tmp_path / "outline.png").read_bytes() == before


# ---------------------------------------------------------------- predict: never over an input or an existing file


@pytest.mark.slow
def test_predict_never_writes_over_an_input_or_an_earlier_output(segmentation_run, tmp_path, capsys):
    """`predict RUN photos/holiday.png --out photos/` keeps the photo (masks are `<stem>_labels.png` /
    `<stem>_color.png`); an existing output is refused in one line unless --overwrite; an input named like an
    output is refused even with --overwrite."""
    run_dir, _ = segmentation_run
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(photos / "holiday.png")
    before = (photos / "holiday.png").read_bytes()
    code, out, _ = _predict(capsys, run_dir, photos / "holiday.png", "--out", photos, "--cpu")
    assert code == 0 and (photos / "holiday.png").read_bytes() == before  # issue 23: the photo used to be replaced
    assert Image.open(photos / "holiday_labels.png").size == (40, 24)
    assert Image.open(photos / "holiday_color.png").mode == "RGB" and (photos / "legend.png").is_file()
    labels = (photos / "holiday_labels.png").read_bytes()
    (photos / "holiday_labels.png").write_bytes(b"mine")
    code, _, err = _predict(capsys, run_dir, photos / "holiday.png", "--out", photos, "--cpu")
    assert code == 2 and err == [
        f"error: {photos / 'holiday_labels.png'} exists (and 1 more); predict never writes over files: "
        "give another --out, or --overwrite"
    ]
    assert (photos / "holiday_labels.png").read_bytes() == b"mine"
    code, _, _ = _predict(capsys, run_dir, photos / "holiday.png", "--out", photos, "--overwrite", "--cpu")
    assert code == 0 and (photos / "holiday_labels.png").read_bytes() == labels
    # an input named like an output is refused, --overwrite or not
    args = [run_dir, photos / "holiday.png", photos / "holiday_labels.png", "--out", photos, "--overwrite"]
    code, _, err = _predict(capsys, *args)
    assert code == 2 and err == [
        f"error: {photos / 'holiday_labels.png'} would replace the input {photos / 'holiday_labels.png'}; "
        "give another --out"
    ]


@pytest.mark.slow
def test_a_16_bit_png_is_segmented_like_its_8_bit_copy(segmentation_run, tmp_path, capsys):
    """A 16-bit grey PNG given to predict is read at its own brightness (not nearly white): same masks as its
    8-bit copy."""
    run_dir, _ = segmentation_run
    grey = np.random.default_rng(1).integers(0, 256, (32, 32)).astype(np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    code, _, _ = _predict(capsys, run_dir, tmp_path / "eight.png", tmp_path / "sixteen.png", "--out", tmp_path / "m")
    assert code == 0
    eight, sixteen = (np.asarray(Image.open(tmp_path / "m" / f"{s}_labels.png")) for s in ("eight", "sixteen"))
    assert np.array_equal(eight, sixteen)


def test_a_16_bit_grey_image_is_read_at_its_own_brightness(tmp_path):
    """The shared image reader scales 16-bit grey to 8 bits (PIL's convert clips it at 255)."""
    from visionpeft.data.images import load_rgb

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    pixels = np.asarray(load_rgb(tmp_path / "ramp.png"))
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert abs(float(pixels.mean()) - 127.5) < 1 and pixels.min() == 0 and pixels.max() == 255  # not nearly white


@pytest.mark.slow
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("palette", [[255, 0]], "task.palette must be one [r, g, b] (integers 0..255) per class (6)"),
        ("palette", "red", "task.palette must be one [r, g, b]"),
        ("id2label", {"1": "a", "7": "b"}, "task.id2label must map the ids 0..1 (as strings) to class names"),
        ("id2label", ["a", "b"], "holds no segmentation adapter"),
    ],
)
def test_a_malformed_palette_or_id2label_is_one_line(segmentation_run, tmp_path, capsys, field, value, message):
    """A malformed `palette` or `id2label` in a segmentation adapter's config is one line naming the file, before
    the model loads."""
    run_dir, _ = segmentation_run
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run_dir / "config.yaml", copy / "config.yaml")
    shutil.copytree(run_dir / "last", copy / "last")
    record = json.loads((copy / "last" / CONFIG_NAME).read_text())
    record["task"][field] = value
    (copy / "last" / CONFIG_NAME).write_text(json.dumps(record))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    code, _, err = _predict(capsys, copy, tmp_path / "a.png", "--out", tmp_path / "m")
    assert code == 2 and len(err) == 1 and message in err[0] and str(copy / "last") in err[0]


@pytest.mark.slow
def test_classification_predict_writes_the_top_classes_as_csv(classification_run, tmp_path, capsys):
    """Classification predict writes the top-k classes and probabilities per image as CSV; an existing CSV is kept
    (one line) and a folder as --out is one line."""
    run_dir, _ = classification_run
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    code, out, _ = _predict(capsys, run_dir, *images, "--top-k", "3", "--out", tmp_path / "labels.csv", "--cpu")
    assert code == 0 and out == [f"wrote the top-3 classes of 2 image(s) to {tmp_path / 'labels.csv'} (last adapter)"]
    rows = list(csv.DictReader((tmp_path / "labels.csv").open()))
    assert [r["image"] for r in rows] == [str(p) for p in images]
    assert list(rows[0]) == [
        "image",
        "label_1",
        "probability_1",
        "label_2",
        "probability_2",
        "label_3",
        "probability_3",
    ]
    for row in rows:
        probs = [float(row[f"probability_{r}"]) for r in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-5
        assert row["label_1"] in (
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        )
    code, _, err = _predict(capsys, run_dir, *images, "--out", tmp_path / "labels.csv")
    assert code == 2 and err[0].startswith(f"error: {tmp_path / 'labels.csv'} exists; predict never writes over files")
    code, _, err = _predict(capsys, run_dir, *images, "--out", tmp_path)
    assert code == 2 and err == [
        f"error: --out {tmp_path} is a folder; a classification run writes one CSV file (e.g. --out labels.csv)"
    ]


# ---------------------------------------------------------------- one line: folders of other kinds, options


@pytest.fixture
def config_only_run(tmp_path):
    """A run folder holding only the config of a (never trained) classification run."""
    config = load_config(tiny_config(tmp_path, tmp_path / "vit.safetensors", tmp_path / "data"))
    (tmp_path / "run").mkdir()
    save_config(config, tmp_path / "run" / "config.yaml")
    return tmp_path / "run"


def test_eval_on_a_folder_of_another_kind_is_one_line(config_only_run, tmp_path, capsys):
    """eval on an adapter folder, a sweep folder, a diffusers pipeline folder, an empty folder, a file or a missing
    path is one line saying what it is and what eval takes."""
    expected = "eval takes a run folder (config.yaml + saved adapters)"
    (config_only_run / "last").mkdir()
    (config_only_run / "last" / CONFIG_NAME).write_text("{}")
    sweep, pipeline, empty = tmp_path / "sweep", tmp_path / "pipe", tmp_path / "empty"
    for folder in (sweep, pipeline, empty):
        folder.mkdir()
    (sweep / "sweep.yaml").write_text("config: x.yaml\n")
    (pipeline / "model_index.json").write_text("{}")
    cases = {
        config_only_run / "last": f"is an adapter folder ({CONFIG_NAME}), not a run; {expected}: its run is "
        f"{config_only_run}",
        sweep: f"is a sweep folder (sweep.yaml), not a run; {expected}: its runs are in {sweep / 'runs'}",
        pipeline: f"is a diffusers pipeline folder (model_index.json), not a run; {expected}: "
        f"`visionpeft generate --model {pipeline}` draws from it",
        empty: f"is an empty folder; {expected}",
        config_only_run / "config.yaml": f"is a file, not a run folder; {expected}",
        tmp_path / "nowhere": f"does not exist; {expected}",
    }
    for folder, message in cases.items():
        code, out, err = _eval(capsys, folder)
        assert code == 2 and out == [] and len(err) == 1 and err[0].startswith(f"error: {folder} {message}"), err


def test_options_that_do_not_apply_and_runs_without_adapters_are_one_line(config_only_run, tmp_path, capsys):
    """An eval / predict option that does not apply to the run's task is one line naming the tasks it applies to; a
    run that saved no adapter yet is one line."""
    code, _, err = _eval(capsys, config_only_run, "--mode", "slide")
    assert code == 2 and err == ["error: eval on a classification run takes no --mode (it applies to: segmentation)"]
    code, _, err = _eval(capsys, config_only_run, "--samples", "3")
    assert code == 2 and err[0].startswith("error: eval on a classification run takes no --samples (it applies to: ")
    code, _, err = _predict(capsys, config_only_run, "--prompt", "x", "--out", tmp_path / "o")
    assert code == 2 and err[0].startswith("error: predict on a classification run takes no --prompt")
    code, _, err = _eval(capsys, config_only_run)
    assert code == 2 and err == [
        f"error: {config_only_run} holds no saved adapter yet (best/, adapter/ or last/ are written at epoch ends "
        f"and at the end; --resume {config_only_run} continues the run)"
    ]


def test_the_commands_name_no_task():
    from visionpeft.registry import TRAINERS

    for command in ("eval", "predict"):
        text = (ROOT / "visionpeft" / "cli" / f"{command}.py").read_text()
        assert [name for name in TRAINERS.names() if name in text] == [], command
