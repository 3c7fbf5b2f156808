"""The demo sweep: every classification method on the project's FractalDB-pretrained tiny ViT, plus the same
architecture trained from scratch as a control, on the mini tasks that ship with scikit-learn / scikit-image.

    python tools/benchmark.py demo [--tasks digits textures faces] [--epochs 8] [--seeds 0 1 2]
    python tools/benchmark.py demo --from-json gallery/demo_results.json   # redraw the table and plot only

Writes ``gallery/demo_results.md`` (test top-1, mean +- std over seeds, and trainable parameters),
``gallery/demo_results.json`` (the command and every run) and ``gallery/demo_accuracy_vs_params.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "configs" / "_base_" / "demo.yaml"
SCRATCH = "scratch"

# label -> config overrides. AdamW as in configs/demo/: 1e-2 / 5e-3 for the small modules, lower for full weights.
RUNS: dict[str, list[str]] = {
    "vpt": ["method={name: vpt, deep: true, num_tokens: 8}", "optim.lr=0.01"],
    "adaptformer": ["method={name: adaptformer, bottleneck: 16}", "optim.lr=0.005"],
    "convpass": ["method={name: convpass, dim: 8, scale: 0.1}", "optim.lr=0.005"],
    "lora": ["method={name: lora, r: 8}", "optim.lr=0.005"],
    "difffit": ["method=difffit", "optim.lr=0.005"],
    "bitfit": ["method=bitfit", "optim.lr=0.005"],
    "linear": ["method=linear", "optim.lr=0.01"],
    "full": ["method=full", "optim.lr=0.0005"],
    SCRATCH: ["method=full", "optim.lr=0.001", "model.checkpoint=null", "model.pretrained=false"],
}
DESCRIPTIONS = {
    "vpt": "VPT-deep, 8 tokens",
    "adaptformer": "AdaptFormer, bottleneck 16",
    "convpass": "Convpass, dim 8, s 0.1",
    "lora": "LoRA r 8 on q, v",
    "difffit": "DiffFit",
    "bitfit": "BitFit",
    "linear": "linear probe",
    "full": "full fine-tuning",
    SCRATCH: "full from random init: the control",
}


def run_one(task: str, label: str, seed: int, epochs: int, runs: Path) -> dict:
    """Trains one (task, method, seed) with the shared classification trainer; returns its result row."""
    from visionpeft.config import load_config
    from visionpeft.trainers.classification import run

    name = f"{task}-{label}-seed{seed}"
    overrides = [f"data.name={task}", f"optim.epochs={epochs}", f"train.seed={seed}", f"train.run_name={name}",
                 f"train.output_dir={runs}", *RUNS[label]]  # fmt: skip
    run_dir = runs / name
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.time()
    metrics = run(load_config(BASE, overrides), run_dir)
    counts = metrics["parameters"]
    return {"task": task, "method": label, "seed": seed, "top1": metrics["test"]["top1"],
            "trainable": counts["trainable"], "head": counts["by_group"].get("head", 0),
            "seconds": time.time() - start}  # fmt: skip


def _cell(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def table(results: list[dict], tasks: list[str], methods: list[str], seeds: list[int], command: str) -> str:
    """The markdown results table with the command that made it and the pretrained-vs-scratch comparison."""

    def top1(task: str, label: str) -> list[float]:
        return [r["top1"] for r in results if r["task"] == task and r["method"] == label]

    heads = ", ".join(f"{t} {next(r['head'] for r in results if r['task'] == t):,}" for t in tasks)
    spread = f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    lines = [
        "# Demo sweep: the FractalDB-pretrained tiny ViT on the mini tasks",
        "",
        f"Made by `{command}`",
        f"on a 2-core CPU. Test top-1 (%) of the epoch chosen on the validation split, {spread}; the train / val /",
        f"test splits are fixed. Trainable parameters exclude the task head ({heads} parameters), which every",
        "method trains. Minutes: wall time of one seed over all tasks, on a machine shared with other jobs",
        "(indicative only). The plot's bars span the seeds.",
        "",
        "| method | trainable params (w/o head) | " + " | ".join(tasks) + " | minutes |",
        "|---|---:|" + "---:|" * len(tasks) + "---:|",
    ]
    for label in methods:
        rows = [r for r in results if r["method"] == label]
        params = rows[0]["trainable"] - rows[0]["head"]
        minutes = sum(r["seconds"] for r in rows) / 60 / len(seeds)
        cells = " | ".join(_cell(top1(t, label)) for t in tasks)
        lines.append(f"| {label} ({DESCRIPTIONS[label]}) | {params:,} | {cells} | {minutes:.1f} |")
    if "full" in methods and SCRATCH in methods:
        gains = [100 * (statistics.fmean(top1(t, "full")) - statistics.fmean(top1(t, SCRATCH))) for t in tasks]
        pretrained = [m for m in methods if m != SCRATCH]
        best = [max(pretrained, key=lambda m, t=t: statistics.fmean(top1(t, m))) for t in tasks]
        lines += [
            "",
            "Full fine-tuning from the FractalDB weights minus the same schedule from scratch: "
            + ", ".join(f"{t} {g:+.1f}" for t, g in zip(tasks, gains))
            + " points. Best pretrained method per task: "
            + ", ".join(f"{t} {b}" for t, b in zip(tasks, best))
            + ".",
        ]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], tasks: list[str], methods: list[str], path: Path) -> None:
    """Test top-1 against trainable parameters (with the head), one panel per task; bars span the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label in methods:
            rows = [r for r in results if r["task"] == task and r["method"] == label]
            accs = [100 * r["top1"] for r in rows]
            x, y = rows[0]["trainable"], statistics.fmean(accs)
            err = [[y - min(accs)], [max(accs) - y]]
            style = {"fmt": "x", "color": "grey"} if label == SCRATCH else {"fmt": "o"}
            ax.errorbar(x, y, yerr=err, capsize=3, **style)
            ax.annotate(label, (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (with head)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    fig.suptitle("tiny ViT pretrained on FractalDB-style images: accuracy vs trainable parameters (x: from scratch)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--tasks", nargs="+", default=["digits", "textures", "faces"])
    parser.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "gallery")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "sweep")
    parser.add_argument("--from-json", type=Path, help="redraw the report from a saved demo_results.json; no training")
    args = parser.parse_args(argv)

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        command, results = saved["command"], saved["runs"]
        tasks, methods, seeds = (list(dict.fromkeys(r[k] for r in results)) for k in ("task", "method", "seed"))
    else:
        tasks, methods, seeds, results = args.tasks, args.methods, args.seeds, []
        for seed in seeds:
            for task in tasks:
                for label in methods:
                    results.append(run_one(task, label, seed, args.epochs, args.runs))
                    print(json.dumps(results[-1]), flush=True)
        command = " ".join(
            ["python tools/benchmark.py demo --tasks", *tasks, "--epochs", str(args.epochs), "--seeds"]
            + [str(s) for s in seeds]
            + (["--methods", *methods] if methods != list(RUNS) else [])
        )
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(results, tasks, methods, seeds, command)
    (args.out / "demo_results.md").write_text(text)
    (args.out / "demo_results.json").write_text(json.dumps({"command": command, "runs": results}, indent=2) + "\n")
    plot(results, tasks, methods, args.out / "demo_accuracy_vs_params.png")
    print(text)
    return 0
