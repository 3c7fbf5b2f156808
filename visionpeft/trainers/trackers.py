"""Experiment trackers of a run (``train.report_to``): TensorBoard, Weights & Biases or none, through accelerate's
trackers, scalars and images.

accelerate creates the tracker (``Accelerator(log_with=...)`` + ``init_trackers``); this module adds what its
``log`` lacks: images (validation samples, prediction grids) go to each tracker's own image call, and a resumed
run's TensorBoard writer purges the events logged after the saved state (``purge_step``), so curves do not fork.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

REPORT_TO = ("tensorboard", "wandb", "none")


def check_report_to(report_to: str) -> None:
    """A tracker whose library is missing is one line before any model is built."""
    if report_to == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("train.report_to=wandb needs the wandb package: pip install wandb")


def tracker_arguments(report_to: str, run_dir: Path | None) -> dict[str, Any]:
    """``Accelerator`` keyword arguments for ``report_to``."""
    if report_to == "none" or run_dir is None:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {
        "log_with": report_to,
        "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
    }


class RunTrackers:
    """The trackers of one run, started on the first record (after a resume has set ``purge_step``)."""

    def __init__(self, accelerator, run_dir: Path, report_to: str) -> None:
        self.accelerator, self.run_dir, self.report_to = accelerator, run_dir, report_to
        self.purge_step: int | None = None
        self._started = False

    def _start(self) -> None:
        if self._started or self.report_to == "none" or not self.accelerator.log_with:
            return
        self._started = True
        if self.report_to == "tensorboard":  # writes RUN/tensorboard (accelerate: logging_dir / project name)
            self.accelerator.init_trackers("tensorboard", init_kwargs={"tensorboard": {"purge_step": self.purge_step}})
        else:
            self.accelerator.init_trackers(
                "visionpeft",
                init_kwargs={"wandb": {"name": self.run_dir.name, "dir": str(self.run_dir), "resume": "allow"}},
            )

    def log(self, values: dict[str, float], step: int) -> None:
        self._start()
        if self._started:
            self.accelerator.log(values, step=step)

    def log_images(self, name: str, images: list, step: int) -> None:
        """Logs PIL images (one panel of ``name``) to every tracker."""
        self._start()
        if not self._started or not images:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                array = np.stack([np.asarray(image.convert("RGB")) for image in _same_size(images)])
                tracker.writer.add_images(name, array, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({name: [wandb.Image(image) for image in images]}, step=step)

    def flush(self) -> None:
        for tracker in self.accelerator.trackers if self._started else ():
            writer = getattr(tracker, "writer", None)
            if writer is not None and hasattr(writer, "flush"):
                writer.flush()


def _same_size(images: list) -> list:
    """TensorBoard stacks a panel into one array: images of another size are resized to the first one's."""
    size = images[0].size
    return [image if image.size == size else image.resize(size) for image in images]
