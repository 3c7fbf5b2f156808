"""The demo sweep: every classification method on the pretrained tiny ViT, plus training from scratch as a
control, on the mini tasks that ship with scikit-learn / scikit-image. Writes ``gallery/demo_results.md`` (test
top-1 and trainable parameters) and ``gallery/demo_accuracy_vs_params.png``.

    python tools/benchmark.py demo [--tasks digits textures faces] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "configs" / "_base_" / "demo.yaml"

# label -> overrides; the learning rates are the demo configs' (AdamW): 1e-2 for the small modules, lower for full
RUNS: dict[str, list[str]] = {
    "vpt": ["method={name: vpt, deep: true, num_tokens: 8}", "optim.lr=0.01"],
    "adaptformer": ["method={name: adaptformer, bottleneck: 16}", "optim.lr=0.005"],
    "convpass": ["method={name: convpass, dim: 8, scale: 0.1}", "optim.lr=0.005"],
    "lora": ["method={name: lora, r: 8}", "optim.lr=0.005"],
    "difffit": ["method=difffit", "optim.lr=0.005"],
    "bitfit": ["method=bitfit", "optim.lr=0.005"],
    "linear": ["method=linear", "optim.lr=0.01"],
    "full": ["method=full", "optim.lr=0.0005"],
    "scratch (full, random init)": ["method=full", "optim.lr=0.001", "model.checkpoint=null", "model.pretrained=false"],
}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in results})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in results if r["task"] == task):
            marker = "x" if r["method"].startswith("scratch") else "o"
            ax.scatter(r["trainable"], 100 * r["top1"], marker=marker)
            ax.annotate(r["method"].split(" ")[0], (r["trainable"], 100 * r["top1"]), fontsize=8,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    fig.suptitle("tiny ViT (FractalDB-pretrained): accuracy vs trainable parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py demo", description=__doc__)
    parser.add_argument("--tasks", nargs="+", default=["digits", "textures", "faces"])
    parser.add_argument("--methods", nargs="+", default=list(RUNS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "gallery")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "sweep")
    args = parser.parse_args(argv)

    import shutil

    from visionpeft.config import load_config
    from visionpeft.trainers.classification import run

    results = []
    for task in args.tasks:
        for label in args.methods:
            name = f"{task}-{label.split(' ')[0]}"
            overrides = [f"data.name={task}", f"optim.epochs={args.epochs}", f"train.run_name={name}",
                         f"train.output_dir={args.runs}", *RUNS[label]]  # fmt: skip
            config = load_config(BASE, overrides)
            run_dir = args.runs / name
            shutil.rmtree(run_dir, ignore_errors=True)
            start = time.time()
            metrics = run(config, run_dir)
            trainable = metrics["parameters"]["trainable"]
            results.append({"task": task, "method": label, "top1": metrics["test"]["top1"], "trainable": trainable,
                            "seconds": time.time() - start})  # fmt: skip
            print(json.dumps(results[-1]))
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python tools/benchmark.py demo " + " ".join(
        ["--tasks", *args.tasks, "--epochs", str(args.epochs)]
        + (["--methods", *args.methods] if args.methods != list(RUNS) else [])
    )
    lines = [
        "# Demo sweep: the tiny ViT on the mini tasks",
        "",
        f"Made by `{command}` ({args.epochs} epochs each, AdamW, batch 64, seed 0, CPU). Test top-1 (%) of the",
        "checkpoint chosen on the validation split; trainable parameters include the task head.",
        "",
        "| method | trainable params | " + " | ".join(args.tasks) + " |",
        "|---|---:|" + "---:|" * len(args.tasks),
    ]
    for label in args.methods:
        row = [r for r in results if r["method"] == label]
        params = ", ".join(sorted({f"{r['trainable']:,}" for r in row}))
        lines.append(f"| {label} | {params} | " + " | ".join(f"{100 * r['top1']:.1f}" for r in row) + " |")
    (args.out / "demo_results.md").write_text("\n".join(lines) + "\n")
    (args.out / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "demo_accuracy_vs_params.png")
    print("\n".join(lines))
    return 0
