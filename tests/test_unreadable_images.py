"""Unreadable image files: found when the dataset is built (or skipped on request), and one line from a worker."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import train as train_tool  # noqa: E402
from _classify_utils import tiny_config, write_pretrained_vit
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from visionpeft.cli.common import run  # noqa: E402
from visionpeft.data.few_images import FewImages, load_images
from visionpeft.data.images import ItemError, WorkerSafe
from visionpeft.errors import DataError
from visionpeft.registry import DATASETS


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (value, 0, 0)).save(path)


def _truncated_jpeg(path):
    """A JPEG cut in half: its header passes ``verify``, decoding it fails."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _folder(root):
    """root/train/{a,b}/ with three images each and root/test/ with one each."""
    for split, count in (("train", 3), ("test", 1)):
        for i, cls in enumerate("ab"):
            for j in range(count):
                _png(root / split / cls / f"{j}.png", 100 * i + j)
    return root


def test_image_folder_names_the_first_bad_file_and_the_count(tmp_path):
    root = _folder(tmp_path / "imgs")
    (root / "train" / "a" / "1.png").write_bytes(b"not a png")
    png = (root / "train" / "b" / "2.png").read_bytes()
    (root / "train" / "b" / "2.png").write_bytes(png[: len(png) // 2])  # truncated
    with pytest.raises(DataError) as info:
        DATASETS.get("imagefolder")("train", root=str(root))
    message = str(info.value)
    assert message.startswith(f"{root / 'train' / 'a' / '1.png'} is not a readable image (")
    assert "; 2 of 6 images in" in message
    assert message.endswith("(set data.options.skip_bad_images=true to leave them out)")
    assert "\n" not in message


def test_image_folder_skips_bad_files_on_request_and_logs_the_count(tmp_path, caplog):
    root = _folder(tmp_path / "imgs")
    (root / "train" / "a" / "1.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="visionpeft"):
        dataset = DATASETS.get("imagefolder")("train", root=str(root), skip_bad_images=True)
    assert len(dataset) == 5 and len(dataset.targets) == 5 and dataset.classes == ["a", "b"]
    assert all(dataset[i][0].size == (32, 32) for i in range(len(dataset)))
    assert "skipped 1 unreadable image of 6" in caplog.text


def test_vtab_list_with_missing_and_corrupt_files(tmp_path):
    task = tmp_path / "dtd"
    for i in range(4):
        _png(task / "images" / f"{i}.png", i)
    (task / "images" / "2.png").write_bytes(b"\x89PNG garbage")
    lines = [f"images/{i}.png {i % 2}" for i in range(4)] + ["images/gone.png 1"]
    (task / "train800.txt").write_text("\n".join(lines) + "\n")
    build = DATASETS.get("vtab-dtd")
    with pytest.raises(DataError, match=r"images/2.png is not a readable image .*; 2 of 5 images in .*train800.txt"):
        build("train800", root=str(tmp_path))
    dataset = build("train800", root=str(tmp_path), skip_bad_images=True)
    assert [path for path, _ in dataset.samples] == ["images/0.png", "images/1.png", "images/3.png"]
    assert dataset.targets == [0, 1, 1]


def test_few_images_name_the_first_bad_file_and_can_skip(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", i)
    (tmp_path / "1.png").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"1.png is not a readable image .*; 1 of 3 images in"):
        load_images(tmp_path)
    assert len(load_images(tmp_path, skip_bad_images=True)) == 2
    assert len(FewImages(tmp_path, "<x>", size=16, skip_bad_images=True)) == 2
    (tmp_path / "0.png").write_bytes(b"broken")
    (tmp_path / "2.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="0.png is not a readable image .*; none of the 3 images in"):
        load_images(tmp_path, skip_bad_images=True)


def test_a_file_that_breaks_after_the_scan_is_one_line_from_a_worker(tmp_path):
    root = _folder(tmp_path / "imgs")
    dataset = DATASETS.get("imagefolder")("train", root=str(root))
    _truncated_jpeg(root / "train" / "a" / "0.png")  # passes no scan now: it is read only by the worker
    loader = DataLoader(dataset, batch_size=6, num_workers=1, collate_fn=list)
    with pytest.raises(ItemError) as info:
        next(iter(loader))
    path = root / "train" / "a" / "0.png"
    assert str(info.value).startswith(f"{path} is not a readable image (OSError: image file is truncated")
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


class _Broken(Dataset):
    classes = ["a", "b"]

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        if index == 2:
            raise OSError(f"[Errno 5] Input/output error: '/mnt/data/{index}.png'")
        return index


def test_worker_safe_turns_read_errors_into_one_line_item_errors():
    wrapped = WorkerSafe(_Broken())
    assert wrapped.classes == ["a", "b"] and len(wrapped) == 4 and wrapped[1] == 1
    with pytest.raises(ItemError) as info:
        list(DataLoader(wrapped, batch_size=1, num_workers=1))
    assert str(info.value) == "item 2 of the dataset cannot be read: [Errno 5] Input/output error: '/mnt/data/2.png'"


@pytest.mark.slow
def test_training_on_a_truncated_jpeg_with_workers_is_one_line(tmp_path, capsys):
    root = _folder(tmp_path / "imgs")
    _truncated_jpeg(root / "train" / "b" / "1.png")  # headers fine (the scan passes), pixels cut off
    cfg = tiny_config(tmp_path, write_pretrained_vit(tmp_path / "vit.safetensors"), root)
    args = [str(cfg), "data.name=imagefolder", "optim.epochs=1", "optim.warmup_epochs=0", "data.num_workers=1"]
    assert run(train_tool.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {root / 'train' / 'b' / '1.png'} is not a readable image"), err


def test_bad_images_can_be_skipped_from_the_config(tmp_path, capsys):
    root = _folder(tmp_path / "imgs")
    (root / "train" / "a" / "2.png").write_bytes(b"junk")
    cfg = tiny_config(tmp_path, write_pretrained_vit(tmp_path / "vit.safetensors"), root)
    base = [str(cfg), "data.name=imagefolder", "--dry-run"]
    assert run(train_tool.main, base) == 2
    assert "(set data.options.skip_bad_images=true to leave it out)" in capsys.readouterr().err
    assert run(train_tool.main, [*base, "data.options.skip_bad_images=true"]) == 0
    assert "skipped 1 unreadable image of 6" in capsys.readouterr().out


def _control_folder(root, lines):
    """A control data folder: target/0.png and source/0.png (32x32) and a metadata.jsonl of ``lines``."""
    _png(root / "target" / "0.png", 200)
    _png(root / "source" / "0.png", 10)
    (root / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    return root


def test_control_metadata_lines_that_are_not_objects_or_leave_the_folder_are_named(tmp_path):
    """Control `metadata.jsonl`: a line that is JSON but not an object (`12345`, `[...]`), or a path that leaves
    `data.root` (`../..`, absolute): one line naming the file and line; nothing outside the data folder is read."""
    from visionpeft.data.control_pairs import read_pairs

    good = '{"image": "target/0.png", "conditioning_image": "source/0.png", "text": "a"}'
    outside = tmp_path / "outside.png"
    _png(outside)
    cases = {
        "12345": "line 2 is 12345, not a JSON object with image, conditioning_image, text",
        '["target/0.png", "source/0.png"]': 'line 2 is ["target/0.png", "source/0.png"], not a JSON object',
        good.replace("source/0.png", "../outside.png"): "line 2: ../outside.png leaves the data folder",
        good.replace("target/0.png", str(outside)): f"line 2: {outside} leaves the data folder",
        good.replace("source/0.png", "source/../../outside.png"): "line 2: source/../../outside.png leaves the",
    }
    for line, message in cases.items():
        root = _control_folder(tmp_path / "data", [good, line])
        with pytest.raises(DataError) as err:
            read_pairs(root)
        assert f"{root / 'metadata.jsonl'} {message}" in str(err.value)
    root = _control_folder(tmp_path / "data", [good, good.replace("source/0.png", "source/../source/0.png")])
    assert len(read_pairs(root)) == 2  # a way down and up again stays inside


def test_a_control_condition_of_another_size_than_its_target_is_refused(tmp_path):
    """A control condition image of another size than its target would be resized and centre-cropped out of
    alignment: refused in one line naming the pair and both sizes, before training."""
    from visionpeft.data.control_pairs import ControlPairs

    good = '{"image": "target/0.png", "conditioning_image": "source/0.png", "text": "a"}'
    root = _control_folder(tmp_path / "data", [good])
    Image.new("RGB", (48, 32)).save(root / "source" / "0.png")
    with pytest.raises(DataError) as err:
        ControlPairs(root, size=16)
    assert str(err.value) == (
        f"condition image {root / 'source' / '0.png'} is 48x32 pixels but its target {root / 'target' / '0.png'} is "
        f"32x32 (listed in {root / 'metadata.jsonl'}); a pair must have one size, since each image is resized and "
        "centre-cropped on its own"
    )


def test_high_bit_depth_images_keep_their_range_in_every_reader(tmp_path):
    """16-bit PNGs (PIL mode `I;16`) and 32-bit integer / float TIFFs (`I`, `F`) are scaled to 8 bits by every
    image reader (image folders, control pairs, few images), not clipped to nearly white."""
    from visionpeft.data.control_pairs import ControlPairs

    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    files = {
        "a.png": Image.fromarray((ramp * 65535).astype(np.uint16)),
        "b.tiff": Image.fromarray((ramp * 65535).astype(np.int32)),
        "c.tiff": Image.fromarray(ramp.astype(np.float32)),
    }
    (tmp_path / "few").mkdir()
    for name, image in files.items():
        image.save(tmp_path / "few" / name)
        (tmp_path / "data" / "train" / "x").mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / "data" / "train" / "x" / name)
    assert {Image.open(tmp_path / "few" / name).mode for name in files} == {"I;16", "I", "F"}
    expected = (ramp * 255).mean()
    few = load_images(tmp_path / "few")  # .tiff is no few-image suffix: the PNG only
    folder = DATASETS.get("imagefolder")("train", root=str(tmp_path / "data"))
    means = [np.asarray(image).mean() for image in few] + [np.asarray(folder[i][0]).mean() for i in range(3)]
    assert len(means) == 4 and all(abs(m - expected) < 1 for m in means), means
    control = tmp_path / "control"
    for name in ("target", "source"):
        (control / name).mkdir(parents=True)
        files["a.png"].save(control / name / "0.png")
    (control / "metadata.jsonl").write_text(
        '{"image": "target/0.png", "conditioning_image": "source/0.png", "text": ""}'
    )
    item = ControlPairs(control, size=32)[0]
    assert abs(float(item["conditioning_pixel_values"].mean()) - 0.5) < 0.01
    assert abs(float(item["pixel_values"].mean())) < 0.02  # [-1, 1]: a full ramp averages 0


def test_a_data_folder_that_is_a_file_says_what_it_is(tmp_path):
    """A data folder (control pairs, few images) given as a file: "is a file, not a folder", not "does not exist"
    (the run config's `data.root` / `data.images` say the same before any model: tests/test_cli_errors.py)."""
    from visionpeft.data.control_pairs import read_pairs

    _png(tmp_path / "photo.png")
    with pytest.raises(DataError, match=r"control data folder .*photo.png is a file, not a folder$"):
        read_pairs(tmp_path / "photo.png")
    with pytest.raises(DataError, match=r"image folder .*photo.png is a file, not a folder$"):
        load_images(tmp_path / "photo.png")
