"""The ``visionpeft`` command: ``visionpeft train|sweep|noah|eval|predict|generate|eval-zeroshot|eval-personalization|
adapters``.

Each subcommand is a module of this package with a ``main(argv)``; ``tools/*.py`` are the same commands run from a
checkout. Arguments are parsed before anything heavy is imported, so ``--help`` and config mistakes answer at once.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("train", "train any registered task from its config (train --help lists the tasks)"),
    "sweep": ("sweep", "hyper-parameter grids and the VTAB-1k protocol, locally or on Slurm / Ray, with a report"),
    "noah": ("noah", "NOAH's subnet search on a trained supernet (sweep executors) and the retrain of the subnet"),
    "eval": ("eval", "evaluate a run's saved adapter as its task does (metrics, or samples and their scores)"),
    "predict": ("predict", "apply a run to new inputs (labels, masks or images, by its task; see --help)"),
    "generate": ("generate", "sample a prompt x seed grid from a pipeline with saved adapters"),
    "eval-zeroshot": ("eval_zeroshot", "zero-shot CLIP with hand-written vs learned prompts"),
    "eval-personalization": ("eval_personalization", "CLIP-T / CLIP-I / DINO scores of generated images"),
    "adapters": ("adapters", "combine, resize, extract or inspect LoRA adapters (PEFT's / sd-scripts' arithmetic)"),
}


def main(argv: list[str] | None = None) -> int:
    from .common import run

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: visionpeft COMMAND [options]   (visionpeft COMMAND --help for its options)", ""]
        lines += [f"  {name:<22}{text}" for name, (_, text) in COMMANDS.items()]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            from ..errors import did_you_mean

            print(f"error: unknown command '{argv[0]}'{did_you_mean(argv[0], COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(f".{COMMANDS[argv[0]][0]}", __name__)
    return run(module.main, argv[1:])
