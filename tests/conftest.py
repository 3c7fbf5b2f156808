"""Shared fixtures; the tiny models themselves live in tiny_models.py."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import tiny_vit

# pytest-xdist workers (pyproject's addopts): one torch thread each, so workers do not oversubscribe the cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def vit():
    return tiny_vit()
