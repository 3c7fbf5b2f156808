"""Fill50k, the ControlNet tutorial's toy task, generated offline: a circle's outline is the condition, the same
circle filled with one colour on a background of another is the target, and the caption names both colours
("pale golden rod circle with old lace background"). A model that learned the control fills the outlined disc.

Deterministic for a seed (same arguments, same bytes). Written in diffusers' ``metadata.jsonl`` layout
(``image``, ``conditioning_image``, ``text``, plus the circle and colours a fill metric needs) with a card of the
generator's parameters. :func:`fill_iou` scores a generated image against its pair; :func:`shape_iou` and
:func:`fill_colour_named` score its shape and its fill colour apart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError

#: the words CSS4 colour names are made of, so "burlywood" reads "burly wood" in a caption
COLOUR_WORDS = frozenset(
    """alice blue antique white aqua marine azure beige bisque black blanched almond violet brown burly wood cadet
    chartreuse chocolate coral corn flower silk crimson cyan dark golden rod gray grey green khaki magenta olive orange
    orchid red salmon sea slate turquoise deep pink sky dim dodger fire brick floral forest fuchsia gainsboro ghost gold
    honey dew hot indian indigo ivory lavender blush lawn lemon chiffon light yellow lime linen maroon medium midnight
    mint cream misty rose moccasin navajo navy old lace drab pale papaya whip peach puff peru plum powder purple rebecca
    rosy royal saddle sandy shell sienna silver snow spring steel tan teal thistle tomato wheat smoke""".split()
)


def colour_words(name: str) -> str:
    """A CSS4 colour name as words, fewest words first: ``palegoldenrod`` -> ``pale golden rod``."""
    best: dict[int, list[str]] = {0: []}
    for end in range(1, len(name) + 1):
        for start in range(end):
            if start in best and name[start:end] in COLOUR_WORDS:
                candidate = best[start] + [name[start:end]]
                if end not in best or len(candidate) < len(best[end]):
                    best[end] = candidate
    return " ".join(best.get(len(name), [name]))


#: The largest side: a pair is drawn as two RGB images in memory (60000 px would be 2 x 10.8 GB), and 4096 px is
#: already 8x Stable Diffusion 1.5's and 4x SDXL's training size (PIL refuses to open images past ~179 M pixels).
MAX_SIZE = 4096


def _colours() -> dict[str, tuple[int, int, int]]:
    from matplotlib.colors import CSS4_COLORS, to_rgb

    return {name: tuple(round(255 * c) for c in to_rgb(value)) for name, value in sorted(CSS4_COLORS.items())}


def make_fill50k(
    out: str | Path, n: int = 50000, size: int = 512, seed: int = 0, palette: Sequence[str] | None = None
) -> Path:
    """Writes ``n`` pairs into ``out`` (``source/``, ``target/``, ``metadata.jsonl``, ``card.json``); ``palette``
    restricts the colours to those CSS4 names (the tiny pipeline's eight, say), else all 148.

    Raises:
        DataError: An unknown palette colour, a negative seed, a size outside 1 .. :data:`MAX_SIZE`, or an ``out``
            that cannot be a folder (checked before anything is written).
    """
    out = Path(out)
    colours = _colours()
    unknown = [name for name in palette or () if name not in colours]
    if unknown or (palette is not None and len(set(palette)) < 2):
        raise DataError(f"--palette: a palette needs two or more matplotlib CSS4 colour names; unknown: {unknown}")
    if seed < 0:
        raise DataError(f"--seed {seed} is negative; a fill50k seed is 0 or more")
    if not 1 <= size <= MAX_SIZE:
        raise DataError(
            f"--size {size} is outside 1 .. {MAX_SIZE}: each pair is drawn as two {size}x{size} RGB images in memory "
            f"({2 * 3 * size * size / 1e9:.1f} GB), and {MAX_SIZE} px is already 8x Stable Diffusion's training size"
        )
    try:
        (out / "source").mkdir(parents=True, exist_ok=True)
        (out / "target").mkdir(parents=True, exist_ok=True)
    except OSError as err:  # out, or a folder above it, is a file; no permission
        raise DataError(f"cannot create the folder {out}: {err.strerror or err}") from None
    names = sorted(set(palette)) if palette else list(colours)
    rng = np.random.default_rng(seed)
    width = max(1, size // 64)
    lines = []
    for i in range(n):
        fill, background = (names[j] for j in rng.choice(len(names), size=2, replace=False))
        radius = int(rng.integers(size // 10, size // 3))
        cx, cy = (int(rng.integers(radius, size - radius)) for _ in range(2))
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        source = Image.new("RGB", (size, size), (0, 0, 0))
        ImageDraw.Draw(source).ellipse(box, outline=(255, 255, 255), width=width)
        target = Image.new("RGB", (size, size), colours[background])
        ImageDraw.Draw(target).ellipse(box, fill=colours[fill])
        source.save(out / "source" / f"{i}.png")
        target.save(out / "target" / f"{i}.png")
        text = f"{colour_words(fill)} circle with {colour_words(background)} background"
        lines.append(
            {
                "image": f"target/{i}.png",
                "conditioning_image": f"source/{i}.png",
                "text": text,
                "size": size,
                "circle": [cx, cy, radius],
                "fill": list(colours[fill]),
                "background": list(colours[background]),
            }
        )
    (out / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    card = {
        "dataset": "fill50k (generated)",
        "generator": "visionpeft.data.fill50k.make_fill50k",
        "n": n,
        "size": size,
        "seed": seed,
        "colours": f"matplotlib CSS4 ({', '.join(names) if palette else '148 names'}; two distinct per pair)",
        "radius": [size // 10, size // 3],
        "outline_width": width,
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out


def _pixels_and_disc(image: Image.Image, record: dict) -> tuple[np.ndarray, np.ndarray]:
    """``image`` as float RGB (H, W, 3) and the pair's disc as a boolean mask at ``image``'s resolution."""
    from .images import as_rgb  # torch-free import of this module (the generator tool)

    pixels = np.asarray(as_rgb(image), dtype=np.float32)
    h, w = pixels.shape[:2]
    # PIL's ellipse covers the pixels cx - r .. cx + r inclusive: a disc of radius r + 1/2 around pixel cx's centre
    cx, cy, radius = ((v + 0.5) * w / record["size"] for v in record["circle"])
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return pixels, (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def fill_iou(image: Image.Image, record: dict, tolerance: float = 60.0) -> float:
    """IoU of the pair's disc and the pixels of ``image`` within ``tolerance`` (RGB distance) of the fill colour,
    at ``image``'s resolution (1.0: the right colour exactly inside the circle)."""
    pixels, disc = _pixels_and_disc(image, record)
    return _iou(disc, np.linalg.norm(pixels - np.asarray(record["fill"], dtype=np.float32), axis=-1) <= tolerance)


def _off_background(pixels: np.ndarray, tolerance: float) -> np.ndarray:
    """The pixels farther than ``tolerance`` (RGB distance) from the image's own background, the median colour of
    its border pixels: what the image draws, whatever its colours."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    return np.linalg.norm(pixels - np.median(border, axis=0), axis=-1) > tolerance


def shape_iou(image: Image.Image, record: dict, tolerance: float = 60.0) -> float:
    """The shape alone, whatever the colours: IoU of the pair's disc and the pixels of ``image`` off its own
    background."""
    pixels, disc = _pixels_and_disc(image, record)
    return _iou(disc, _off_background(pixels, tolerance))


def fill_colour_named(image: Image.Image, record: dict, palette: Sequence[str], tolerance: float = 60.0) -> bool:
    """The colour alone, wherever the shape: whether the median colour of the pixels of ``image`` off its own
    background is nearest (RGB distance) to the caption's fill colour among the ``palette``'s CSS4 colours (False
    for an image that draws nothing)."""
    pixels, _ = _pixels_and_disc(image, record)
    drawn = _off_background(pixels, tolerance)
    if not drawn.any():
        return False
    shown = np.median(pixels[drawn], axis=0)
    colours = {name: np.asarray(rgb, dtype=np.float32) for name, rgb in _colours().items() if name in set(palette)}
    nearest = min(colours, key=lambda name: float(np.linalg.norm(shown - colours[name])))
    return bool(np.array_equal(colours[nearest], np.asarray(record["fill"], dtype=np.float32)))
