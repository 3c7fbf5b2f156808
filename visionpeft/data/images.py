"""Reading image files safely: an up-front scan for unreadable files, and item errors that stay one line when a
``DataLoader`` worker raises them.

A dataset built from files scans them when it is built (:func:`screen_images`: ``PIL.Image.open`` + ``verify``,
which reads headers and, for PNG, checks the chunks without decoding pixels), so a corrupt file stops the run before
the first step, with one :class:`DataError` naming the first bad file and how many are bad; opting in to skipping
drops them and logs how many.

A file that passes the scan can still fail to decode later (a truncated JPEG). Inside a worker process torch catches
the exception and re-raises ``type(err)(text)`` in the main process, where ``text`` is "Caught X in DataLoader worker
process N." followed by the worker's whole traceback. :class:`ItemError` takes that text back to the original
message, so the command line still prints one line; :class:`WorkerSafe` turns any read error of a wrapped dataset
into an :class:`ItemError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import DataError

logger = logging.getLogger(__name__)

#: How a run opts in to leaving unreadable images out (the dataset keyword ``skip_bad_images``).
SKIP_HINT = "set data.options.skip_bad_images=true"
_WORKER_PREFIX = "Caught "
_WORKER_TRACEBACK = "\nOriginal Traceback"


class ItemError(DataError):
    """A dataset item cannot be read; re-raised by a ``DataLoader`` worker, it keeps its one-line message."""

    def __init__(self, message: str) -> None:
        if message.startswith(_WORKER_PREFIX) and _WORKER_TRACEBACK in message:
            last = message.rstrip().splitlines()[-1]  # "visionpeft.data.images.ItemError: <the message>"
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


def _reason(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "missing"
    text = str(err).strip().splitlines()
    if isinstance(err, UnidentifiedImageError) or not text:  # its text only repeats the path
        return type(err).__name__
    return f"{type(err).__name__}: {text[0][:80]}"


def unreadable(first: str, bad: int, total: int, where: str, hint: str | None = None) -> str:
    """The message for ``bad`` unreadable images of ``total`` in ``where``; ``first`` says what is wrong with the
    first one; ``hint`` how to leave them out (when some are readable)."""
    if bad == total:
        return first if total == 1 else f"{first}; none of the {total} images in {where} is readable"
    leave = f" ({hint} to leave {'it' if bad == 1 else 'them'} out)" if hint else ""
    return f"{first}; {bad} of {total} images in {where} are unreadable{leave}"


def as_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. High-bit-depth grey (16-bit PNG / TIFF: PIL modes ``I;16*``, ``I``; float ``F``) is
    scaled to 8 bits first: PIL's own ``convert`` clips those values at 255, which turns a 16-bit picture nearly
    white. (16-bit RGB files already open as 8-bit ``RGB`` / ``RGBA``.)"""
    if image.mode.startswith("I") or image.mode == "F":
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        full = 1.0 if image.mode == "F" and values.max(initial=0) <= 1.0 else 65535.0
        image = Image.fromarray(np.clip(np.round(values * 255.0 / full), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Opens an image as 8-bit RGB (:func:`as_rgb`); a missing or corrupt file is an :class:`ItemError` naming it."""
    try:
        with Image.open(path) as image:
            return as_rgb(image)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError ... on broken files
        raise ItemError(f"{path} is not a readable image ({_reason(err)})") from None


def header_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file from its header (pixels not decoded); an unreadable file is a
    :class:`DataError` naming it."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as err:  # whatever a broken file makes PIL raise
        raise DataError(f"{path} is not a readable image ({_reason(err)})") from None


def image_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a readable image (headers and structure checked, pixels not decoded), or None."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # whatever a broken file makes PIL raise
        return _reason(err)
    return None


def screen_images(paths: Sequence[str | Path], where: str, skip: bool, hint: str = SKIP_HINT) -> list[int]:
    """Scans image files; returns the indices of the readable ones.

    Args:
        paths: The files, in dataset order.
        where: What holds them, for the messages (a folder, a list file).
        skip: Leave unreadable files out (logging how many) instead of failing.
        hint: How the user opts in to skipping.

    Raises:
        DataError: A file is unreadable and ``skip`` is False (naming the first one and the count), or no file is
            readable.
    """
    workers = min(16, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(image_problem, paths))
    bad = [i for i, problem in enumerate(problems) if problem is not None]
    if not bad:
        return list(range(len(paths)))
    first = f"{paths[bad[0]]} is not a readable image ({problems[bad[0]]})"
    if len(bad) == len(paths) or not skip:
        raise DataError(unreadable(first, len(bad), len(paths), where, hint))
    logger.warning(
        "skipped %d unreadable image%s of %d in %s (first: %s)",
        len(bad),
        "" if len(bad) == 1 else "s",
        len(paths),
        where,
        first,
    )
    skipped = set(bad)
    return [i for i in range(len(paths)) if i not in skipped]


class WorkerSafe(Dataset):
    """Wraps a dataset so that an item's read error (a :class:`DataError` or ``OSError``) is an :class:`ItemError`,
    which stays one line when a ``DataLoader`` worker re-raises it in the main process. ``classes`` and ``targets``
    of the wrapped dataset are passed through, and a segmentation dataset's ``palette``, ``ignore_index`` and
    ``files``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        for attr in ("classes", "targets", "palette", "ignore_index", "files"):
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except ItemError:
            raise
        except DataError as err:
            raise ItemError(str(err).strip().splitlines()[0]) from None
        except OSError as err:
            raise ItemError(f"item {index} of the dataset cannot be read: {str(err).strip().splitlines()[0]}") from None
