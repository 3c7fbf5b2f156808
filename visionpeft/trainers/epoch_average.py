"""A weighted average of the trained tensors taken at the end of every epoch, with the per-epoch weights an attached
method gives through its ``epoch_weights`` capability (PromptSRC's Gaussian prompt aggregation).

Unlike the EMA (a decay per optimizer step, used for every evaluation), the sum is complete only after the run's last
epoch: evaluation during training sees the trained tensors, and the finished run leaves the sum in the model (what the
last evaluation, the ``last`` adapter and the test then use). The sums are part of the resumable state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import methods_of
from ..errors import CheckpointError, ConfigError

AVERAGE_FILE = "epoch_average.safetensors"


class EpochAverage:
    """``sum_e weights[e - 1] * tensors after epoch e`` over the trained tensors ``params`` (kept in fp32).

    Args:
        params: The trained parameters (what the optimizer updates).
        weights: One weight per epoch of the run, in order.
        source: The method that gave the weights (for messages).
    """

    def __init__(self, params: list[nn.Parameter], weights: list[float], source: str) -> None:
        self.params, self.weights, self.source = params, list(weights), source
        self.sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.added = 0  # the last epoch added

    def add(self, epoch: int) -> None:
        """Adds the tensors as they are after ``epoch`` (1-based) with that epoch's weight."""
        weight = self.weights[epoch - 1]
        with torch.no_grad():
            for total, p in zip(self.sums, self.params):
                total.add_(p.detach().float(), alpha=weight)
        self.added = epoch

    def copy_to(self) -> None:
        """Puts the average into the trained tensors."""
        with torch.no_grad():
            for total, p in zip(self.sums, self.params):
                p.copy_(total.to(p.dtype))

    def save(self, folder: Path) -> dict[str, Any]:
        """Writes the sums as safetensors; returns the scalar state (for ``progress.json``)."""
        from safetensors.torch import save_file

        save_file(
            {f"sum.{i}": t.detach().cpu().contiguous() for i, t in enumerate(self.sums)}, str(folder / AVERAGE_FILE)
        )
        return {"added": self.added, "source": self.source}

    def load(self, folder: Path, settings: dict[str, Any] | None) -> None:
        """Restores the sums :meth:`save` wrote (a state without them is an error: this run averages)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = folder / AVERAGE_FILE
        if settings is None or not path.is_file():
            raise CheckpointError(f"{folder} holds no epoch average, but this run keeps one ({self.source})")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None
        sums = [tensors.get(f"sum.{i}") for i in range(len(self.sums))]
        if len(tensors) != len(sums) or any(t is None or t.shape != s.shape for t, s in zip(sums, self.sums)):
            raise CheckpointError(f"{path} does not fit this run's trained parameters")
        for total, saved in zip(self.sums, sums):
            total.copy_(saved)
        self.added = int(settings["added"])


def epoch_average(model: nn.Module, params: list[nn.Parameter], epochs: int) -> EpochAverage | None:
    """The average the attached methods ask for over a run of ``epochs`` epochs (None when none does).

    Raises:
        ConfigError: Two attached methods give epoch weights.
    """
    providers = [m for m in methods_of(model) if "epoch_weights" in m.provides]
    if not providers:
        return None
    if len(providers) > 1:
        names = ", ".join(m.name for m in providers)
        raise ConfigError(f"{names} each average the trained weights over epochs; attach only one of them")
    method = providers[0]
    return EpochAverage(params, method.epoch_weights(epochs), method.name)
