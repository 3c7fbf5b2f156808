"""FractalDB-style formula-driven images, generated deterministically on the fly.

After Kataoka et al., "Pre-training without Natural Images", ACCV 2020 (FractalDB): a category is an iterated
function system (IFS) of 2-4 random affine maps ``(x, y) -> (a x + b y + e, c x + d y + f)`` with parameters drawn
uniformly from [-1, 1] and a map chosen with probability proportional to ``|det|``. A drawn system is kept only if
its attractor covers enough of the canvas - FractalDB's *filling rate* test, which rejects systems that collapse to
a point or a line. An instance varies its category (FractalDB's intra-category augmentation): the parameters are
re-weighted by factors in [0.9, 1.1], the image is flipped at random and drawn in a random colour on black.
Rendering is the chaos game with many walkers in parallel. Nothing is downloaded; the same ``(seed, category,
instance)`` always gives the same image.

Scaled down for a 2-core CPU, with one honest difference from the official search: FractalDB renders 100,000 points
into 512 x 512 pixels and keeps a system at a filling rate of at least 0.2; here ~10,000 points are rendered into
64 x 64 pixels and the threshold is 0.08 (a segment covers about 0.02 of that canvas, a point far less), since
filling rates depend on the point count and resolution. See ``datasets/fractaldb.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..registry import DATASETS

FILL_SIZE = 64
MIN_FILL = 0.08
MAX_TRIES = 1000


def chaos_game(
    maps: np.ndarray,
    probs: np.ndarray,
    rng: np.random.Generator,
    walkers: int = 256,
    steps: int = 48,
    burn_in: int = 8,
) -> np.ndarray:
    """Points of an IFS attractor.

    Args:
        maps: (n, 6) affine maps as ``a, b, c, d, e, f``.
        probs: Probability of each map.
        rng: Source of the walkers' starts and map choices.
        walkers: Independent chains run in parallel.
        steps: Map applications per chain.
        burn_in: Leading steps dropped while the chains converge onto the attractor.

    Returns:
        (walkers * (steps - burn_in), 2) points.
    """
    points = rng.uniform(-1, 1, (walkers, 2))
    out = []
    for step in range(steps):
        choice = rng.choice(len(maps), size=walkers, p=probs)
        a = maps[choice]
        points = np.stack(
            [
                a[:, 0] * points[:, 0] + a[:, 1] * points[:, 1] + a[:, 4],
                a[:, 2] * points[:, 0] + a[:, 3] * points[:, 1] + a[:, 5],
            ],
            axis=1,
        )
        if step >= burn_in:
            out.append(points)
    return np.concatenate(out)


def rasterize(points: np.ndarray, size: int) -> np.ndarray:
    """A ``size`` x ``size`` boolean canvas with the points scaled to fit, aspect kept, centred."""
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


def contract(maps: np.ndarray) -> np.ndarray:
    """A copy whose maps' linear parts have largest singular value at most 0.95, so every map contracts."""
    out = maps.copy()
    for m in out:
        s = np.linalg.svd(m[:4].reshape(2, 2), compute_uv=False)[0]
        if s >= 0.95:
            m[:4] *= 0.95 / s
    return out


def filling_rate(maps: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> float:
    """Fraction of a ``FILL_SIZE`` x ``FILL_SIZE`` canvas the attractor covers (FractalDB's category test)."""
    return float(rasterize(chaos_game(maps, probs, rng), FILL_SIZE).mean())


def category_system(category: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The IFS of a category: the first seeded draw whose filling rate reaches ``MIN_FILL``.

    Returns:
        (maps (n, 6) as ``a, b, c, d, e, f``; probabilities proportional to ``|det|``).
    """
    rng = np.random.default_rng([seed, category])
    for _ in range(MAX_TRIES):
        n = int(rng.integers(2, 5))
        maps = contract(rng.uniform(-1, 1, (n, 6)))
        dets = np.abs(maps[:, 0] * maps[:, 3] - maps[:, 1] * maps[:, 2]) + 1e-3
        probs = dets / dets.sum()
        if filling_rate(maps, probs, rng) >= MIN_FILL:
            return maps, probs
    raise DataError(f"no IFS with filling rate >= {MIN_FILL} in {MAX_TRIES} draws for fractal category {category}")


def render_instance(
    maps: np.ndarray, probs: np.ndarray, instance: int, category: int, size: int, seed: int = 0
) -> Image.Image:
    """One image of a category: parameters re-weighted by [0.9, 1.1], a random flip, a random colour on black."""
    rng = np.random.default_rng([seed, category, instance, 1])
    jittered = contract(maps * rng.uniform(0.9, 1.1, maps.shape))
    canvas = rasterize(chaos_game(jittered, probs, rng, walkers=192, steps=40), size)
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]
    colour = rng.uniform(0.4, 1.0, 3)
    return Image.fromarray((canvas[..., None] * colour * 255).astype(np.uint8))


class FractalDB(Dataset):
    """``categories`` x ``instances`` fractal images; each is rendered on first access and cached in the process.

    Args:
        categories: Number of IFS categories (FractalDB-1k has 1,000).
        instances: Images per category.
        size: Image side in pixels.
        seed: Seed of the category systems and of the instances.
        transform: Applied to the PIL image.
        first_instance: Index of the first instance; disjoint train / val sets use disjoint ranges.
    """

    def __init__(
        self,
        categories: int = 100,
        instances: int = 100,
        size: int = 32,
        seed: int = 0,
        transform: Callable | None = None,
        first_instance: int = 0,
    ) -> None:
        self.categories, self.instances, self.size, self.seed = categories, instances, size, seed
        self.first_instance, self.transform = first_instance, transform
        self.classes = [f"fractal_{c:04d}" for c in range(categories)]
        self.targets = [i // instances for i in range(categories * instances)]
        self._systems: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cache: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return self.categories * self.instances

    def system(self, category: int) -> tuple[np.ndarray, np.ndarray]:
        """The category's IFS (maps, probabilities), searched once per process."""
        if category not in self._systems:
            self._systems[category] = category_system(category, self.seed)
        return self._systems[category]

    def __getitem__(self, index: int):
        category, instance = divmod(index, self.instances)
        image = self._cache.get(index)
        if image is None:
            maps, probs = self.system(category)
            image = render_instance(maps, probs, self.first_instance + instance, category, self.size, self.seed)
            self._cache[index] = image
        return (self.transform(image) if self.transform else image), category


@DATASETS.register("fractaldb")
def fractaldb(
    split: str,
    root: str | None = None,
    transform: Callable | None = None,
    categories: int = 100,
    instances: int = 100,
    size: int = 32,
    seed: int = 0,
    val_instances: int = 10,
    **_,
) -> FractalDB:
    """FractalDB-style data (Kataoka et al., ACCV 2020), generated on the fly; ``root`` is unused.

    Args:
        split: ``train`` uses instances [0, instances) of every category; ``val`` (also served as ``test``) the
            next ``val_instances``, so held-out images are new variations of the training categories.
        categories: Number of IFS categories.
        instances: Training images per category.
        size: Image side in pixels.
        seed: Seed of the whole set.
        val_instances: Held-out images per category.
    """
    if split == "train":
        return FractalDB(categories, instances, size, seed, transform)
    if split in ("val", "test"):
        return FractalDB(categories, val_instances, size, seed, transform, first_instance=instances)
    raise DataError(f"fractaldb has the splits train and val (also served as test), not '{split}'")
