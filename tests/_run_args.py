"""The command line of a tiny training run in the tests (``tools/train.py``'s arguments), so that each test module
writes only what its runs change: the loader takes the last value of a key given twice, so ``overrides`` win over
the tiny-run settings."""

from __future__ import annotations

from pathlib import Path

#: a personalization / control run small enough for a unit test: 16 px, batch 2, 3 steps, fp32, loss logged each step
TINY_RUN = (
    "data.size=16",
    "data.batch_size=2",
    "optim.grad_accum=1",
    "optim.steps=3",
    "train.mixed_precision=no",
    "train.log_every=1",
)


def train_args(config: str, runs: Path, run_name: str, *overrides: str, tiny: tuple[str, ...] = TINY_RUN) -> list[str]:
    """``tools/train.py`` arguments: the config (a name under ``configs/``, ``.yaml`` added when missing), ``tiny``,
    the run folder ``runs/run_name``, ``--cpu``, then ``overrides``."""
    path = config if config.endswith(".yaml") else f"{config}.yaml"
    return [
        f"configs/{path}",
        *tiny,
        f"train.output_dir={runs}",
        f"train.run_name={run_name}",
        "--cpu",
        *overrides,
    ]
