"""Mixed precision for the benchmarks' hand-written steps, as accelerate applies it in a training run: autocast for
the forward, and under fp16 a gradient scaler for the backward and the optimizer step. Both sides of a comparison
step through the same object, so a ratio measures the methods, not two ways of doing mixed precision."""

from __future__ import annotations

import contextlib

import torch

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("no", *HALF)


class Amp:
    def __init__(self, device: str | torch.device, precision: str = "no") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.device_type = torch.device(device).type
        self.dtype = HALF.get(precision)
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward, optimizer step (skipped by the scaler on inf / nan under fp16), zeroed gradients."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        optimizer.zero_grad(set_to_none=True)


def synchronize(device: str | torch.device) -> None:
    """Waits for queued GPU work, so a wall-clock interval covers the work it timed (nothing to wait for on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
