"""Loggers for the trainers: records from the main process only, as plain lines.

accelerate's ``get_logger`` also logs on the main process only, but prefixes every record with ``[RANK i]``; a
single-process run (the usual one) should read like any other program's output.
"""

from __future__ import annotations

import logging
from typing import Any


class MainProcessLogger(logging.LoggerAdapter):
    """Passes records on in the main process (or before any distributed state exists) and drops them elsewhere."""

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        from accelerate.state import PartialState

        if not PartialState._shared_state or PartialState().is_main_process:
            self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> MainProcessLogger:
    return MainProcessLogger(logging.getLogger(name), {})
