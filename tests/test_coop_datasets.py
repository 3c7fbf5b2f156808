"""CoOp's 11 few-shot data sets (visionpeft/data/coop_datasets.py) on tiny fake layouts written here, the ``coop11``
task set, and the grids/coop11 sweep specs (each loads and dry-runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _demo_utils import ROOT
from _sweep_utils import sweep
from PIL import Image

from visionpeft.data.coop_datasets import COOP_DATASETS
from visionpeft.data.fewshot import base_new_split, few_shot
from visionpeft.errors import ConfigError, DataError
from visionpeft.registry import DATASETS
from visionpeft.sweep.tasks import COOP11_TASKS, dataset_of, resolve_tasks

SPECS = sorted((ROOT / "grids" / "coop11").glob("*.yaml"))
PETS = [
    "abyssinian",
    "american_bulldog",
    "basset_hound",
    "great_pyrenees",
]  # OxfordPets' breeds as its reader writes them
VARIANTS = ["707-320", "A300B4", "Cessna 172"]


def _png(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (shade, 0, 255 - shade)).save(path, format="PNG")  # PNG bytes under a .jpg name is fine


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """OxfordPets (split json, 4 breeds: 3 train + 1 val + 2 test images each), FGVCAircraft (variants.txt + image
    lists: 2 / 1 / 1 per variant) and ImageNet (classnames.txt + 3 class folders: 2 train + 1 val images each)."""
    data = tmp_path_factory.mktemp("coop")
    pets = data / "oxford_pets"
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, breed in enumerate(PETS):
        for part, count in (("train", 3), ("val", 1), ("test", 2)):
            for i in range(count):
                name = f"{breed}_{part}{i}.jpg"
                _png(pets / "images" / name, 40 * label + i)
                split[part].append([name, label, breed])
    (pets / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    fgvc = data / "fgvc_aircraft"
    (fgvc / "images").mkdir(parents=True)
    (fgvc / "variants.txt").write_text("\n".join(VARIANTS) + "\n")
    number = 1000000
    for part, count in (("train", 2), ("val", 1), ("test", 1)):
        lines = []
        for variant in VARIANTS:
            for _ in range(count):
                number += 1
                _png(fgvc / "images" / f"{number}.jpg", number % 200)
                lines.append(f"{number} {variant}")
        (fgvc / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    imagenet = data / "imagenet"
    imagenet.mkdir()
    (imagenet / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    for label, wnid in enumerate(["n01484850", "n01440764", "n01443537"]):  # labels follow the sorted folder names
        for part, count in (("train", 2), ("val", 1)):
            for i in range(count):
                _png(imagenet / "images" / part / wnid / f"{wnid}_{i}.JPEG", 60 * label + i)
    return data


def test_oxford_pets_reads_its_split_file_with_coop_class_names(root):
    build = DATASETS.get("coop-oxford_pets")
    sizes = {split: len(build(split, root=str(root))) for split in ("train", "val", "test")}
    assert sizes == {"train": 12, "val": 4, "test": 8}
    train = build("train", root=str(root))
    assert train.classes == ["abyssinian", "american bulldog", "basset hound", "great pyrenees"]  # "_" -> " "
    assert train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    image, label = train[4]
    assert label == 1 and image.mode == "RGB" and image.size == (8, 6)
    assert train.template == "a photo of a {}, a type of pet."


def test_fgvc_aircraft_reads_variants_and_image_lists(root):
    build = DATASETS.get("coop-fgvc_aircraft")
    train, val, test = (build(split, root=str(root)) for split in ("train", "val", "test"))
    assert train.classes == VARIANTS  # variants.txt order; "Cessna 172" keeps its space
    assert (len(train), len(val), len(test)) == (6, 3, 3)
    assert train.targets == [0, 0, 1, 1, 2, 2] and test.targets == [0, 1, 2]
    assert train.samples[0][0] == root / "fgvc_aircraft" / "images" / "1000001.jpg"
    assert train[0][0].size == (8, 6)


def test_imagenet_reads_class_folders_and_tests_on_val(root):
    build = DATASETS.get("coop-imagenet")
    train, val, test = (build(split, root=str(root)) for split in ("train", "val", "test"))
    assert train.classes == ["tench", "goldfish", "great white shark"]  # sorted wnids n01440764 < n01443537 < ...
    assert (len(train), len(val)) == (6, 3)
    assert [p for p, _ in val.samples] == [p for p, _ in test.samples]  # CoOp: val is the test set
    assert train.targets == [0, 0, 1, 1, 2, 2]
    path, label = train.samples[0]
    assert path.parent.name == "n01440764" and label == 0


def test_few_shot_and_base_new_split_work_on_them(root):
    train = DATASETS.get("coop-oxford_pets")("train", root=str(root))
    two = few_shot(train, 2, seed=1)
    assert len(two) == 8 and sorted(two.targets) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert few_shot(train, 2, seed=1).indices == two.indices
    base, new = base_new_split(train, "base"), base_new_split(train, "new")
    assert base.classes == ["abyssinian", "american bulldog"] and new.classes == ["basset hound", "great pyrenees"]
    assert (len(base), len(new)) == (6, 6) and set(new.targets) == {0, 1}
    fgvc = DATASETS.get("coop-fgvc_aircraft")("train", root=str(root))
    assert base_new_split(fgvc, "base").classes == VARIANTS[:2]  # ceil(3 / 2) base classes, as CoCoOp's split
    with pytest.raises(DataError, match="fewer than the 4 shots"):
        few_shot(train, 4)


def test_a_missing_folder_or_split_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(ConfigError) as err:
        DATASETS.get("coop-dtd")("train", root=str(tmp_path))
    assert "\n" not in str(err.value)
    assert str(tmp_path / "dtd") in str(err.value) and "DATASETS.md" in str(err.value)
    (tmp_path / "eurosat").mkdir()
    with pytest.raises(ConfigError, match="split_zhou_EuroSAT.json does not exist"):
        DATASETS.get("coop-eurosat")("test", root=str(tmp_path))
    with pytest.raises(ConfigError, match="needs data.root"):
        DATASETS.get("coop-ucf101")("train")


def test_coop11_is_the_eleven_registered_data_sets():
    tasks = resolve_tasks(["coop11"])
    assert tasks == list(COOP11_TASKS) == list(COOP_DATASETS) and len(tasks) == 11
    assert all(dataset_of(task) == task and task in DATASETS.names() for task in tasks)
    assert resolve_tasks(["coop-dtd", "dtd"]) == ["coop-dtd", "dtd"]  # CoOp's DTD beside VTAB-1k's


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_every_coop11_spec_dry_runs(spec, root, tmp_path, capsys):
    code, out, err = sweep([spec, f"data.root={root}", "--dry-run", "--out", tmp_path / "sweep"], capsys)
    assert code == 0, out + err
    assert "pending coop-" in out


@pytest.mark.parametrize(
    "spec, extra",
    [
        ("coop_fewshot", ["optim.epochs=50", "--tasks", "coop-imagenet"]),
        ("kgcoop_fewshot", ["method.template=a photo of a {}, a type of texture.", "--tasks", "coop-dtd"]),
        ("promptsrc_fewshot", ["method.gpa_mean=45", "method.gpa_std=5", "--tasks", "coop-eurosat", "coop-dtd"]),
        (
            "tip_adapter_f_fewshot",
            ["method.search_scale=[12, 10]", "method.init_alpha=2", "optim.epochs=100", "--tasks", "coop-eurosat"],
        ),
    ],
)
def test_the_per_data_set_commands_of_the_specs_comments_load(spec, extra, root, tmp_path, capsys):
    """As the comments write them: the overrides before ``--tasks`` (which takes every word after it)."""
    path = ROOT / "grids" / "coop11" / f"{spec}.yaml"
    code, out, err = sweep([path, f"data.root={root}", "--dry-run", "--out", tmp_path / "s", *extra], capsys)
    assert code == 0, out + err
    task = extra[extra.index("--tasks") + 1]
    assert f"pending {task}/" in out


def test_a_base_to_new_run_trains_on_a_coop_layout(root, tmp_path):
    """Two CoOp steps of the embedded tiny CLIP on 2 shots of OxfordPets' base classes; tested on base and new."""
    from visionpeft.config import load_config
    from visionpeft.trainers.classification import run as train

    overrides = [
        "data.name=coop-oxford_pets",
        f"data.root={root}",
        "data.shots=2",
        "data.class_split=base",
        "data.options={}",
        "data.val_split=null",
        "data.batch_size=4",
        "optim.steps=2",
        "optim.warmup_steps=0",
        f"train.output_dir={tmp_path}",
    ]
    results = train(load_config(ROOT / "configs" / "demo" / "coop_tiny_clip.yaml", overrides), tmp_path / "r", cpu=True)
    assert set(results["test"]) >= {"top1", "loss"} and set(results["test_new"]) >= {"top1", "loss"}
