"""Name -> object registries for methods, backbones, datasets (classification and segmentation) and trainers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping of unique names to objects, with helpful errors for unknown names.

    Args:
        kind: What the registry holds ("method", "dataset", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a name can be registered only once."""

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Returns the object registered under ``name`` or raises a :class:`ConfigError` with a suggestion."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise ConfigError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; known: {known}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


METHODS: Registry = Registry("method")
DATASETS: Registry = Registry("dataset")
SEGMENTATION_DATASETS: Registry = Registry("segmentation dataset")  # name -> fn(split, root, transform, **options)
TRAINERS: Registry = Registry("task")  # task name -> config.tasks.TaskSpec (schema + trainer)
