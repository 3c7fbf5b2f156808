"""User-facing errors.

Every mistake a user can make (a bad config key, a missing file, a method that does not fit the backbone, a
checkpoint from another model) raises a subclass of :class:`VisionPEFTError` whose message is one complete
sentence. The command-line tools print that sentence and exit non-zero instead of showing a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VisionPEFTError(Exception):
    """Base class of errors caused by user input rather than by a bug."""


class ConfigError(VisionPEFTError):
    """A configuration value or key is invalid."""


class IncompatibleMethodError(VisionPEFTError):
    """A method cannot be attached to (or merged into) the given backbone."""


class UnsupportedBackboneError(VisionPEFTError):
    """The object given to ``attach`` is not a backbone visionpeft knows."""


class CheckpointError(VisionPEFTError):
    """An adapter checkpoint is missing, corrupt or belongs to another model."""


class DataError(VisionPEFTError):
    """A dataset, image folder or image file is missing or unreadable."""


class ModelLoadError(VisionPEFTError):
    """Pretrained weights could not be found or loaded."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Returns a ``" (did you mean 'x'?)"`` suffix for the closest choice, or an empty string. A choice with the
    same letters in another order comes first (a swapped pair, ``vtp`` for ``vpt``, is the commonest typo; difflib
    alone rates ``vp`` closer)."""
    choices = [str(c) for c in choices]
    swapped = [c for c in choices if c != str(name) and sorted(c) == sorted(str(name))]
    close = swapped[:1] or difflib.get_close_matches(str(name), choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
