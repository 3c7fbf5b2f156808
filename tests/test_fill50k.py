"""The offline fill50k generator: deterministic, captions in words, and a fill metric that tells a filled disc
from a wrong colour."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from PIL import Image

from visionpeft.data.fill50k import colour_words, fill_colour_named, fill_iou, make_fill50k, shape_iou


def _digest(folder) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


def test_same_seed_same_bytes_and_captions_in_words(tmp_path):
    a, b, c = (make_fill50k(tmp_path / name, n=6, size=64, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert _digest(a) == _digest(b) != _digest(c)
    records = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["text"].endswith(" background") for r in records)
    assert (a / records[0]["conditioning_image"]).is_file() and (a / records[0]["image"]).is_file()
    assert colour_words("palegoldenrod") == "pale golden rod" and colour_words("burlywood") == "burly wood"
    assert colour_words("gainsboro") == "gainsboro"


def test_fill_iou_is_one_on_the_target_and_zero_on_the_wrong_colour(tmp_path):
    folder = make_fill50k(tmp_path / "f", n=3, size=64, seed=0)
    for record in (json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()):
        target = Image.open(folder / record["image"])
        assert fill_iou(target, record) > 0.95  # edge pixels of the drawn disc round either way
        assert fill_iou(target.resize((32, 32), Image.NEAREST), record) > 0.85  # half size: a 5-px disc, coarse edges
        wrong = tuple(255 - c for c in record["fill"])
        assert fill_iou(Image.new("RGB", (64, 64), wrong), record) < 0.05
        assert (
            fill_iou(
                Image.fromarray(np.zeros((64, 64, 3), np.uint8) + np.array(record["background"], np.uint8)), record
            )
            < 0.05
        )


def test_shape_and_colour_are_scored_apart(tmp_path):
    """A target with the fill recoloured keeps its shape score and loses the colour; a blob of the fill colour
    elsewhere keeps the colour and loses the shape; a blank image has neither."""
    palette = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
    folder = make_fill50k(tmp_path / "f", n=4, size=32, seed=0, palette=palette)
    for record in (json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()):
        target = np.asarray(Image.open(folder / record["image"]).convert("RGB"))
        assert shape_iou(Image.fromarray(target), record) > 0.85 and fill_colour_named(
            Image.fromarray(target), record, palette
        )
        other = next(c for c in ([255, 0, 0], [0, 128, 0]) if c not in (record["fill"], record["background"]))
        recoloured = target.copy()
        recoloured[(target == record["fill"]).all(-1)] = other
        assert shape_iou(Image.fromarray(recoloured), record) > 0.85
        assert not fill_colour_named(Image.fromarray(recoloured), record, palette)
        blank = np.zeros_like(target) + np.array(record["background"], np.uint8)
        elsewhere = blank.copy()  # a blob of the fill colour in the corner farthest from the disc
        cx, cy, _ = record["circle"]
        rows = slice(2, 8) if cy >= 16 else slice(24, 30)
        columns = slice(2, 8) if cx >= 16 else slice(24, 30)
        elsewhere[rows, columns] = record["fill"]
        assert shape_iou(Image.fromarray(elsewhere), record) < 0.1
        assert fill_colour_named(Image.fromarray(elsewhere), record, palette)
        blank = Image.fromarray(blank)
        assert shape_iou(blank, record) == 0.0 and not fill_colour_named(blank, record, palette)


def test_the_tool_refuses_a_non_empty_folder(tmp_path, capsys):
    import make_fill50k as tool

    from visionpeft.cli.common import run

    assert run(tool.main, ["--out", str(tmp_path / "d"), "--n", "2", "--size", "32"]) == 0
    before = _digest(tmp_path / "d")
    assert run(tool.main, ["--out", str(tmp_path / "d"), "--n", "2", "--size", "32"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'd'} is not empty; give a new folder"
    assert _digest(tmp_path / "d") == before


def test_a_palette_restricts_the_colours_and_a_bad_one_is_one_line(tmp_path, capsys):
    make_fill50k(tmp_path / "small", n=30, size=32, seed=0, palette=["red", "blue", "yellow"])
    records = [json.loads(line) for line in (tmp_path / "small" / "metadata.jsonl").read_text().splitlines()]
    words = {word for r in records for word in r["text"].replace(" circle with ", " ").split()} - {"background"}
    assert words == {"red", "blue", "yellow"}
    import make_fill50k as tool

    from visionpeft.cli.common import run

    assert run(tool.main, ["--out", str(tmp_path / "bad"), "--n", "2", "--size", "32", "--palette", "red", "blu"]) == 2
    assert "unknown: ['blu']" in capsys.readouterr().err and not (tmp_path / "bad").exists()
