"""Name -> object registries for methods, backbones, datasets (classification and segmentation) and trainers."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from .errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping of unique names to objects, with helpful errors for unknown names.

    Args:
        kind: What the registry holds ("method", "dataset", ...), used in error messages.
        providers: Modules whose import registers entries; imported on the first lookup, so a caller never has to
            import them for their side effect (and the registry, on the ground floor, names them only as strings).
        name_attribute: The attribute in which an entry states its own name (a method class's ``name``): registering
            it under any other name fails, so the name an entry answers to and the name it is found by never differ.
    """

    def __init__(self, kind: str, providers: Sequence[str] = (), name_attribute: str | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._name_attribute = name_attribute
        self._providers = tuple(providers)
        self._loaded = not self._providers

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._providers:
                importlib.import_module(module)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a name can be registered only once."""

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            if self._name_attribute is not None:
                own = getattr(obj, self._name_attribute, None)
                if own != name:
                    raise ValueError(
                        f"{self.kind} {getattr(obj, '__qualname__', obj)!s} states its {self._name_attribute} as "
                        f"{own!r} but is registered as '{name}'"
                    )
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Returns the object registered under ``name`` or raises a :class:`ConfigError` with a suggestion."""
        self._load()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise ConfigError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; known: {known}"
            ) from None

    def registered(self) -> list[T]:
        """The entries filed so far, without importing the providers (for checks made while they register)."""
        return list(self._items.values())

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


METHODS: Registry = Registry("method", providers=("visionpeft.methods",), name_attribute="name")
DATASETS: Registry = Registry("dataset", providers=("visionpeft.data", "visionpeft.demo"))
SEGMENTATION_DATASETS: Registry = Registry(
    "segmentation dataset", providers=("visionpeft.data.segmentation",)
)  # name -> fn(split, root, transform, **options)
TRAINERS: Registry = Registry(
    "task", providers=("visionpeft.config.tasks",)
)  # task name -> config.tasks.TaskSpec (schema + trainer)
