"""Shared fixtures; the tiny models themselves live in tiny_models.py."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_vit

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def vit():
    return tiny_vit()
