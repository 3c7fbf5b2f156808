"""The demo sweep: every classification method on the project's FractalDB-pretrained tiny ViT, plus the same
architecture trained from scratch as a control, on the mini tasks that ship with scikit-learn / scikit-image.

    python tools/benchmark.py demo [--spec grids/demo.yaml] [--tasks digits textures faces] [--epochs 8] [--seeds 0 1 2]
                                   [--workers 2]

It is the sweep spec ``grids/demo.yaml`` (a small learning-rate grid per method, the holdout protocol: choose on
val, train on train + val, test per seed) run by ``tools/sweep.py`` into ``runs/sweeps/demo``; interrupted, it
resumes where it stopped. From the sweep's report it writes ``gallery/<spec>_results.md`` (the table and the command),
``gallery/<spec>_results.json`` (the command and the table's rows) and ``gallery/<spec>_accuracy_vs_params.png``,
``<spec>`` the spec file's stem (``demo``; ``grids/demo_zoo.yaml``: the [zoo] methods, ``demo_zoo``).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "grids" / "demo.yaml"


def command_line(args: argparse.Namespace) -> str:
    """The command as a user would type it (what the gallery says made it)."""
    spec = [] if args.spec.resolve() == SPEC else ["--spec", _shown(args.spec)]
    parts = ["python tools/benchmark.py demo", *spec, "--tasks", *args.tasks, "--epochs", str(args.epochs), "--seeds"]
    parts += map(str, args.seeds)
    for option, default in (("--runs", ROOT / "runs" / "sweeps" / args.spec.stem), ("--out", ROOT / "gallery")):
        value = getattr(args, option[2:])
        if value is not None and Path(value).resolve() != default:
            parts += [option, _shown(Path(value))]
    return " ".join(parts)


def _shown(path: Path) -> str:
    """``path`` relative to the checkout when it is inside it (as a user types it from there)."""
    path = path.resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def gallery_text(summary: str, command: str, spec: str = "grids/demo.yaml") -> str:
    """The sweep's ``summary.md`` under the demo's title, saying which command made it."""
    body = summary.split("\n", 1)[1].lstrip("\n")  # without the report's own title
    return (
        "# Demo sweep: the FractalDB-pretrained tiny ViT on the mini tasks\n\n"
        f"Made by `{command}`\n"
        f"on a 2-core CPU shared with other jobs (the spec: `{spec}`). Test top-1 (%) of the final stage.\n\n" + body
    )


def write_gallery(sweep_dir: Path, out: Path, command: str, name: str = "demo") -> str:
    """Copies the sweep's report into the gallery files ``<name>_*``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = gallery_text((sweep_dir / "summary.md").read_text(), command, f"grids/{name}.yaml")
    (out / f"{name}_results.md").write_text(text)
    with open(sweep_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    (out / f"{name}_results.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    if (sweep_dir / "accuracy_vs_params.png").is_file():
        shutil.copyfile(sweep_dir / "accuracy_vs_params.png", out / f"{name}_accuracy_vs_params.png")
    return text


def main(argv: list[str]) -> int:
    from visionpeft.cli.common import run
    from visionpeft.cli.sweep import main as sweep

    parser = argparse.ArgumentParser(
        prog="tools/benchmark.py demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=["digits", "textures", "faces"])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--workers", type=int, default=1, help="local worker processes")
    parser.add_argument("--out", type=Path, default=ROOT / "gallery")
    parser.add_argument("--spec", type=Path, default=SPEC, help="the sweep spec (default: grids/demo.yaml)")
    parser.add_argument("--runs", type=Path, help="the sweep folder (default: runs/sweeps/<spec stem>)")
    args = parser.parse_args(argv)
    name = args.spec.stem
    args.runs = args.runs or ROOT / "runs" / "sweeps" / name

    checkpoint = f"model.checkpoint={ROOT / 'checkpoints' / 'tiny_vit_fractal.safetensors'}"  # from any folder
    code = run(
        sweep,
        [
            str(args.spec),
            f"optim.epochs={args.epochs}",
            checkpoint,
            "--tasks",
            *args.tasks,
            "--seeds",
            *map(str, args.seeds),
            "--workers",
            str(args.workers),
            "--out",
            str(args.runs),
        ],
    )
    if code == 2:
        return code
    print(write_gallery(args.runs, args.out, command_line(args), name))
    return code
