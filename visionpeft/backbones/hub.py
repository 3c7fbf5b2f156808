"""Fast offline detection for the Hugging Face hub.

With no network, hub clients retry for most of a minute before giving up. One TCP connect with a short timeout
tells at once; when it fails, the loaders run in the hub's offline mode, so cached files still load and missing
ones fail immediately.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection (checked once per process)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Runs the block in the hub's offline mode when the hub cannot be reached; yields whether it can."""
    from huggingface_hub import constants

    reachable = hub_reachable()
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or not reachable
    try:
        yield reachable
    finally:
        constants.HF_HUB_OFFLINE = previous
