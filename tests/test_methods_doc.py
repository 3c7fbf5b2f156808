"""docs/methods.md describes every registered method: a ``### `name` `` heading (or ``### `a` / `b` `` for methods
sharing a section), and no heading for a method that does not exist."""

from __future__ import annotations

import re

from _classify_utils import ROOT

from visionpeft.registry import METHODS


def documented_methods() -> set[str]:
    names: set[str] = set()
    for line in (ROOT / "docs" / "methods.md").read_text().splitlines():
        if line.startswith("### "):
            names.update(re.findall(r"`([a-z0-9_]+)`", line.split(":", 1)[0]))
    return names


def test_every_registered_method_has_a_section_and_every_section_a_method():
    registered = set(METHODS.names())
    documented = documented_methods()
    assert registered - documented == set(), "methods missing from docs/methods.md"
    assert documented - registered == set(), "docs/methods.md describes methods that are not registered"
