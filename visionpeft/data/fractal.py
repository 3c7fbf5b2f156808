"""FractalDB-style formula-driven images (Kataoka et al., ACCV 2020), generated deterministically on the fly.

Each category is an iterated function system (IFS): 2-4 random contractive affine maps, drawn from a seeded
generator and kept only if its attractor covers enough of the canvas (FractalDB's "filling rate" test, here at
least 8% of a 64 x 64 render). An instance re-weights the category's parameters slightly (FractalDB's
intra-category variation), flips it at random and colours it, then renders it with the chaos game, many walkers
in parallel. Nothing is downloaded; the same (category, instance) always gives the same image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..registry import DATASETS

FILL_SIZE = 64
MIN_FILL = 0.08


def _render(maps: np.ndarray, probs: np.ndarray, size: int, rng: np.random.Generator, walkers: int = 256,
            steps: int = 48, burn_in: int = 8) -> np.ndarray:  # fmt: skip
    """Chaos game: ``walkers`` independent chains of ``steps`` random map applications; returns (n, 2) points."""
    points = rng.uniform(-1, 1, (walkers, 2))
    out = []
    for step in range(steps):
        choice = rng.choice(len(maps), size=walkers, p=probs)
        a = maps[choice]
        points = np.stack(
            [a[:, 0] * points[:, 0] + a[:, 1] * points[:, 1] + a[:, 4],
             a[:, 2] * points[:, 0] + a[:, 3] * points[:, 1] + a[:, 5]], axis=1,
        )  # fmt: skip
        if step >= burn_in:
            out.append(points)
    return np.concatenate(out)


def _rasterize(points: np.ndarray, size: int) -> np.ndarray:
    finite = points[np.isfinite(points).all(axis=1)]
    if len(finite) == 0:
        return np.zeros((size, size), dtype=bool)
    lo, hi = finite.min(axis=0), finite.max(axis=0)
    scale = (size - 1) / np.maximum(hi - lo, 1e-6).max()
    centre = (size - 1 - (hi - lo) * scale) / 2
    xy = np.clip(((finite - lo) * scale + centre).round().astype(int), 0, size - 1)
    canvas = np.zeros((size, size), dtype=bool)
    canvas[xy[:, 1], xy[:, 0]] = True
    return canvas


def _contract(maps: np.ndarray) -> np.ndarray:
    """Rescales each map's linear part so its largest singular value is below 1 (a contraction)."""
    out = maps.copy()
    for m in out:
        s = np.linalg.svd(m[:4].reshape(2, 2), compute_uv=False)[0]
        if s >= 0.95:
            m[:4] *= 0.95 / s
    return out


def category_system(category: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The IFS of a category: (maps (n, 6) as a, b, c, d, e, f; probabilities proportional to |det|)."""
    rng = np.random.default_rng([seed, category])
    for _ in range(1000):
        n = int(rng.integers(2, 5))
        maps = _contract(rng.uniform(-1, 1, (n, 6)))
        dets = np.abs(maps[:, 0] * maps[:, 3] - maps[:, 1] * maps[:, 2]) + 1e-3
        probs = dets / dets.sum()
        fill = _rasterize(_render(maps, probs, FILL_SIZE, rng), FILL_SIZE).mean()
        if fill >= MIN_FILL:
            return maps, probs
    raise RuntimeError(f"no IFS with filling rate >= {MIN_FILL} found for category {category}")


def render_instance(maps: np.ndarray, probs: np.ndarray, instance: int, category: int, size: int, seed: int = 0):
    """One image of a category: jittered parameters, random flip, a random colour on black."""
    rng = np.random.default_rng([seed, category, instance, 1])
    jittered = _contract(maps * rng.uniform(0.9, 1.1, maps.shape))
    canvas = _rasterize(_render(jittered, probs, size, rng, walkers=192, steps=40), size)
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]
    colour = rng.uniform(0.4, 1.0, 3)
    image = (canvas[..., None] * colour * 255).astype(np.uint8)
    return Image.fromarray(image)


class FractalDB(Dataset):
    """``categories`` x ``instances`` fractal images, rendered on first access and cached.

    Args:
        categories: Number of IFS categories (FractalDB-1k has 1,000).
        instances: Images per category.
        size: Image side in pixels.
        seed: Seed of the category systems.
        transform: Applied to the PIL image.
        first_instance: Index of the first instance (disjoint train / val sets use different ranges).
    """

    def __init__(self, categories: int = 100, instances: int = 100, size: int = 32, seed: int = 0,
                 transform=None, first_instance: int = 0) -> None:  # fmt: skip
        self.categories, self.instances, self.size, self.seed = categories, instances, size, seed
        self.first_instance, self.transform = first_instance, transform
        self.classes = [f"fractal_{c:04d}" for c in range(categories)]
        self.targets = [i // instances for i in range(categories * instances)]
        self._systems: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cache: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return self.categories * self.instances

    def __getitem__(self, index: int):
        category, instance = divmod(index, self.instances)
        image = self._cache.get(index)
        if image is None:
            if category not in self._systems:
                self._systems[category] = category_system(category, self.seed)
            maps, probs = self._systems[category]
            image = render_instance(maps, probs, self.first_instance + instance, category, self.size, self.seed)
            self._cache[index] = image
        return (self.transform(image) if self.transform else image), category


@DATASETS.register("fractaldb")
def fractaldb(split: str, root: str | None = None, transform=None, categories: int = 100,
              instances: int = 100, size: int = 32, seed: int = 0, val_instances: int = 10, **_):  # fmt: skip
    """FractalDB-style data; ``train`` uses instances [0, instances), ``val`` the next ``val_instances``."""
    if split == "train":
        return FractalDB(categories, instances, size, seed, transform)
    if split in ("val", "test"):
        return FractalDB(categories, val_instances, size, seed, transform, first_instance=instances)
    raise DataError(f"fractaldb has the splits train and val, not '{split}'")
