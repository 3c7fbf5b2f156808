"""The CLIP gallery: the embedded tiny CLIP (checkpoints/tiny_clip) zero-shot with hand-written prompts, against
learned prompts and adapters, few-shot and base-to-new, on clip_mix (real images that ship with scikit-learn /
scikit-image; digit 7, the brick texture and 16 circle colour pairs held out of the CLIP's pretraining).

    python tools/benchmark.py clip-demo [--methods linear coop cocoop kgcoop maple prograd ivlp promptsrc clip_adapter
                                        tip_adapter_f tip_adapter] [--shots 1 2 4 8 16]
                                        [--seeds 1 2 3] [--steps 40]
    python tools/benchmark.py clip-demo --resume     # run only what gallery/clip/results.json lacks (a resumed
                                                     # record keeps its runs, methods, seeds and note)
    python tools/benchmark.py clip-demo --resume --methods coop --shots 1 2 4 8 --base-to-new-methods cocoop maple
    python tools/benchmark.py clip-demo --from-json [--note TEXT]  # redraw the table and plot only

Every trained run is ``configs/demo/coop_tiny_clip.yaml`` (one recipe for every method: SGD lr 0.02, batch 16,
``--steps`` steps, nothing selected: the test split is evaluated once, after the last step) with the method, shots
and seed changed, trained by the classification trainer; ``tip_adapter`` is training-free (its cache from the same
few-shot images, beta / alpha searched on val: :func:`visionpeft.cli.eval_zeroshot.training_free_classifier`).
Few-shot: the 23 subjects, test top-1. Base-to-new (CoCoOp's protocol): 16 shots of the first 12 subjects, test
top-1 on them (base) and, with the same learned context, on the other 11 (new); HM is the harmonic mean of the mean
base and new accuracies. Writes ``gallery/clip/results.md``, ``results.json`` (the command and every run) and
``fewshot.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "demo" / "coop_tiny_clip.yaml"
MODEL = ROOT / "checkpoints" / "tiny_clip"
OUT = ROOT / "gallery" / "clip"
#: method -> (config overrides, description); None: training-free
#: IVLP's / PromptSRC's deep prompts on the tiny CLIP (4 layers per tower): the official 4 + 4 tokens, depth 3
_DEEP = "n_ctx_text: 4, n_ctx_vision: 4, prompt_depth_text: 3, prompt_depth_vision: 3, ctx_init: 'a photo of a'"
METHODS = {
    "linear": (["method=linear", "model.clip_head=linear"], "linear head (text-initialised)"),
    "coop": ([], "CoOp, 4 context tokens from 'a photo of a'"),
    "cocoop": (["method={name: cocoop, n_ctx: 4, ctx_init: 'a photo of a'}"], "CoCoOp, 4 tokens + meta-net"),
    "kgcoop": (["method={name: kgcoop}"], "KgCoOp, 4 tokens, weight 8"),
    "maple": (["method={name: maple, n_ctx: 2, prompt_depth: 3}"], "MaPLe, 2 tokens, depth 3 of 4"),
    "prograd": (["method={name: prograd, n_ctx: 4, ctx_init: 'a photo of a'}"], "ProGrad, 4 tokens, lambda 1"),
    "ivlp": ([f"method={{name: ivlp, {_DEEP}}}"], "IVLP, 4 + 4 tokens, depth 3 of 4"),
    "promptsrc": ([f"method={{name: promptsrc, {_DEEP}}}"], "PromptSRC, 4 + 4 tokens, depth 3 of 4, weights 25 / 10"),
    "clip_adapter": (
        ["method={name: clip_adapter, reduction: 4, ratio: 0.2, template: 'a photo of a {}.'}"],
        "CLIP-Adapter, reduction 4, residual ratio 0.2",
    ),
    "tip_adapter_f": (
        ["method={name: tip_adapter_f, templates: ['a photo of a {}.'], augment_epochs: 10}"],
        "Tip-Adapter-F, keys fine-tuned (beta / alpha on val)",
    ),
    "tip_adapter": (None, "Tip-Adapter, training-free (beta / alpha on val)"),
}
#: methods whose learned context applies to class names it never saw (the base-to-new rows)
TRANSFERS = ("coop", "cocoop", "kgcoop", "maple", "prograd", "ivlp", "promptsrc")
#: trained methods that pick settings on the validation split after training (Tip-Adapter-F's beta / alpha search):
#: their runs keep ``val`` for it and are tested on ``test``; every other run is evaluated once on ``test``
SELECT_ON_VAL = ("tip_adapter_f",)


def command_line(args: argparse.Namespace) -> str:
    parts = ["python tools/benchmark.py clip-demo", *(["--resume"] if args.resume else [])]
    parts += ["--methods", *args.methods, "--shots", *map(str, args.shots)]
    if args.no_base_to_new:
        parts.append("--no-base-to-new")
    elif args.base_to_new_methods is not None:
        parts += ["--base-to-new-methods", *args.base_to_new_methods]
    return " ".join([*parts, "--seeds", *map(str, args.seeds), "--steps", str(args.steps)])


def fewshot_methods(record: dict) -> list[str]:
    """The methods with few-shot runs in ``record``, in :data:`METHODS`' order."""
    ran = {r["method"] for r in record["few_shot"]}
    return [m for m in METHODS if m in ran]


def evaluate(classifier, dataset) -> float:
    """Top-1 (%) of ``classifier`` on ``dataset`` (items ``(image tensor, label)``)."""
    from torch.utils.data import DataLoader

    from visionpeft.cli.eval_zeroshot import evaluate as top1

    return 100 * top1(classifier, DataLoader(dataset, batch_size=256))[0]


def trained(model: Path, method: str, shots: int, seed: int, steps: int, runs: Path, base_only: bool = False) -> dict:
    """Trains one run; returns its test top-1 (%) and, for ``base_only``, the new classes' top-1 of its adapter (the
    trainer tests a ``data.class_split=base`` run on the new classes too)."""
    from visionpeft.config import load_config
    from visionpeft.trainers.classification import run as train

    name = f"{method}-{shots}shot-seed{seed}" + ("-base" if base_only else "")
    overrides = [
        f"model.name={model}",
        f"train.output_dir={runs}",
        f"train.run_name={name}",
        f"data.shots={shots}",
        f"train.seed={seed}",
        f"optim.steps={steps}",
        f"train.eval_every={steps}",
        # evaluated once, after the last step, on the test split (read once); a method that selects on val keeps it
        *(["data.test_split=test"] if method in SELECT_ON_VAL else ["data.val_split=test", "data.test_split=null"]),
        *METHODS[method][0],
        *(["data.class_split=base"] if base_only else []),
    ]
    results = train(load_config(CONFIG, overrides), runs / name, cpu=True)
    row = {"top1": 100 * results["test" if method in SELECT_ON_VAL else "eval"]["top1"]}
    if base_only:
        row["new"] = 100 * results["test_new"]["top1"]
    return row


def training_free(model: Path, shots: int, seed: int) -> dict:
    """Tip-Adapter on the same few-shot draw as a training run of ``seed``; test top-1 (%)."""
    from visionpeft.cli.eval_zeroshot import training_free_classifier
    from visionpeft.data.fewshot import few_shot
    from visionpeft.demo.clip_mix import clip_mix
    from visionpeft.demo.pretrain_clip import eval_transform, load_folder
    from visionpeft.trainers.classification import Transformed

    clip = load_folder(model).eval()
    transform = eval_transform(clip)
    train = Transformed(few_shot(clip_mix("train"), shots, seed=seed), transform)
    test = clip_mix("test")
    classifier = training_free_classifier(
        clip, list(test.classes), "tip_adapter", train, Transformed(clip_mix("val"), transform), seed, 256
    )
    return {"top1": evaluate(classifier, Transformed(test, transform))}


def zero_shot(model: Path) -> dict:
    """Zero-shot rows: by subset and held-in / held-out (single template, the 8 pretraining templates), and the
    base / new halves of the subjects with the single template."""
    from visionpeft.data.fewshot import base_new_split
    from visionpeft.demo.clip_mix import TEMPLATES, clip_mix
    from visionpeft.demo.pretrain_clip import eval_transform, load_folder, zero_shot_accuracy
    from visionpeft.tasks.clip_classifier import CLIPClassifier
    from visionpeft.trainers.classification import Transformed

    clip = load_folder(model).eval()
    rows = {
        "single template": zero_shot_accuracy(clip, "test", TEMPLATES[:1]),
        f"{len(TEMPLATES)} templates": zero_shot_accuracy(clip, "test", TEMPLATES),
    }
    test = clip_mix("test")
    rows["all subjects"] = evaluate(CLIPClassifier(clip, test.classes).eval(), Transformed(test, eval_transform(clip)))
    for part in ("base", "new"):
        data = base_new_split(test, part)
        rows[part] = evaluate(CLIPClassifier(clip, data.classes).eval(), Transformed(data, eval_transform(clip)))
    return rows


def mean_std(values: list[float], seeds: int | None = None) -> str:
    """``mean ± std``; a cell with fewer runs than the ``seeds`` of its table says how many it has."""
    if seeds is not None and len(values) < seeds:
        return f"{statistics.mean(values):.1f} ({len(values)} of {seeds} seeds)"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def markdown(record: dict) -> str:
    from visionpeft.demo.clip_mix import class_names
    from visionpeft.metrics.base_to_new import harmonic_mean

    zs = record["zero_shot"]
    chance = {s: 100 / len(class_names(s)) for s in ("subjects", "circles")}
    commands = " then ".join(f"`{c}`" for c in record.get("commands") or [record["command"]])
    lines = [
        "# The tiny CLIP: zero-shot, few-shot and base-to-new",
        "",
        f"Made by {commands} on a 2-core CPU shared with other jobs ({record['minutes']:.0f} minutes).",
        "Model: `checkpoints/tiny_clip` (its card says how it was pretrained and what was held out). Data: `clip_mix`,",
        "test split (never seen in pretraining). Top-1 (%); mean ± std over seeds "
        + ", ".join(map(str, record["seeds"]))
        + ".",
        *(["", record["note"]] if record.get("note") else []),
        "",
        "## Zero-shot (hand-written prompts)",
        "",
        f"Subjects: 23-way (chance {chance['subjects']:.1f}); held out of pretraining: digit 7 and the brick",
        f"texture, whose words the model never read. Circles: 56 colour pairs (chance {chance['circles']:.1f}); 16",
        "pairs held out, each of their colour words seen in other pairs.",
        "",
        "| prompts | subjects, held-in | subjects, held-out | circles, seen pairs | circles, held-out pairs |",
        "|---|---:|---:|---:|---:|",
    ]
    for label in ("single template", "8 templates"):
        s = zs[label]
        lines.append(
            f"| {label} | {s['subjects/held_in']:.1f} | {s['subjects/held_out']:.1f} | "
            f"{s['circles/held_in']:.1f} | {s['circles/held_out']:.1f} |"
        )
    shots = sorted({r["shots"] for r in record["few_shot"]})
    lines += [
        "",
        f"## Few-shot (23 subjects; zero-shot 'a photo of a {{}}.': {zs['all subjects']:.1f})",
        "",
        f"Every trained method: `{CONFIG.relative_to(ROOT)}`, {record['steps']} SGD steps of batch 16, lr 0.02, the",
        "same for all (not tuned per method).",
        "",
        "| method | " + " | ".join(f"{k} shot{'s' if k > 1 else ''}" for k in shots) + " |",
        "|---|" + "---:|" * len(shots),
        "| zero-shot CLIP ('a photo of a {}.'; no training) | "
        + " | ".join(f"{zs['all subjects']:.1f}" for _ in shots)
        + " |",
    ]
    for method in fewshot_methods(record):
        cells = []
        for k in shots:
            values = [r["top1"] for r in record["few_shot"] if r["method"] == method and r["shots"] == k]
            cells.append(mean_std(values, len(record["seeds"])) if values else "-")
        lines.append(f"| {METHODS[method][1]} | " + " | ".join(cells) + " |")
    if record["base_to_new"]:
        lines += [
            "",
            "## Base-to-new (16 shots of the 12 base subjects; the 11 new ones never trained on)",
            "",
            "| method | base | new | HM |",
            "|---|---:|---:|---:|",
            f"| zero-shot CLIP ('a photo of a {{}}.') | {zs['base']:.1f} | {zs['new']:.1f} | "
            f"{harmonic_mean(zs['base'], zs['new']):.1f} |",
        ]
        for method in TRANSFERS:
            runs = [r for r in record["base_to_new"] if r["method"] == method]
            if runs:
                base, new = [r["top1"] for r in runs], [r["new"] for r in runs]
                hm = harmonic_mean(statistics.mean(base), statistics.mean(new))
                lines.append(f"| {METHODS[method][1]} | {mean_std(base)} | {mean_std(new)} | {hm:.1f} |")
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8.4, 4.6))
    colours = plt.get_cmap("tab20").colors  # one colour per method (the default cycle repeats after 10)
    for i, method in enumerate(fewshot_methods(record)):
        shots = sorted({r["shots"] for r in record["few_shot"] if r["method"] == method})
        values = [[r["top1"] for r in record["few_shot"] if r["method"] == method and r["shots"] == k] for k in shots]
        means = [statistics.mean(v) for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        style = {"color": colours[(2 * i) % 20 + (2 * i) // 20], "marker": "osD^vP"[i % 6]}
        axis.errorbar(shots, means, yerr=stds, capsize=3, alpha=0.9, label=method, **style)
    axis.axhline(record["zero_shot"]["all subjects"], color="gray", linestyle="--", label="zero-shot")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("shots per class")
    axis.set_ylabel("test top-1 (%)")
    axis.set_title("tiny CLIP, 23 clip_mix subjects")
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(record: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    text = markdown(record)
    (out / "results.md").write_text(text)
    if record["few_shot"]:
        plot(record, out / "fewshot.png")
    return text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/benchmark.py clip-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--no-base-to-new", action="store_true", help="skip the base-to-new runs")
    parser.add_argument(
        "--base-to-new-methods",
        nargs="*",
        choices=TRANSFERS,
        help="the methods of the base-to-new runs (default: those of --methods that transfer to new classes)",
    )
    parser.add_argument(
        "--note", help="a paragraph for results.md (kept by --resume unless given again; --from-json replaces it)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--model", type=Path, default=MODEL, help="the open_clip folder (default: checkpoints/tiny_clip)"
    )
    parser.add_argument("--resume", action="store_true", help="keep the runs results.json holds; run the others")
    parser.add_argument("--from-json", action="store_true", help="only redraw results.md / fewshot.png")
    args = parser.parse_args(argv)
    saved = args.out / "results.json"
    if args.from_json:
        record = json.loads(saved.read_text())
        print(write({**record, "note": args.note} if args.note else record, args.out))
        return 0
    import torch

    start = time.time()
    old = json.loads(saved.read_text()) if args.resume and saved.is_file() else {}
    if old and old["steps"] != args.steps:
        parser.error(f"{saved} holds runs of --steps {old['steps']}; resume with the same --steps")
    record = {  # a resumed record keeps its runs and adds this command's
        "command": command_line(args),
        "commands": [*(old.get("commands") or [old["command"]] if old else []), command_line(args)],
        "methods": [m for m in METHODS if m in {*old.get("methods", []), *args.methods}],
        "seeds": sorted({*old.get("seeds", []), *args.seeds}),
        "steps": args.steps,
        "zero_shot": old.get("zero_shot") or zero_shot(args.model),
        "few_shot": old.get("few_shot", []),
        "base_to_new": old.get("base_to_new", []),
        "minutes": old.get("minutes", 0.0),
        **({"note": args.note or old.get("note")} if args.note or old.get("note") else {}),
    }
    done = {(r["method"], r["shots"], r["seed"]) for r in record["few_shot"]}
    done_b2n = {(r["method"], r["seed"]) for r in record["base_to_new"]}
    transfers = [m for m in TRANSFERS if m in args.methods]
    b2n_methods = (
        [] if args.no_base_to_new else (transfers if args.base_to_new_methods is None else args.base_to_new_methods)
    )
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        for seed in args.seeds:
            # base-to-new (16 shots) right after the first shot count: an interrupted run has both tables started
            b2n = [(m, "base-to-new") for m in b2n_methods]
            jobs = [(m, shots) for shots in args.shots for m in args.methods]
            jobs[len(args.methods) : len(args.methods)] = b2n
            for method, shots in jobs:
                if (method, shots, seed) in done or (shots == "base-to-new" and (method, seed) in done_b2n):
                    continue
                torch.manual_seed(seed)
                if shots == "base-to-new":
                    row = trained(args.model, method, 16, seed, args.steps, runs, base_only=True)
                    record["base_to_new"].append({"method": method, "seed": seed, **row})
                    print(f"{method} base-to-new seed {seed}: base {row['top1']:.1f}, new {row['new']:.1f}", flush=True)
                else:
                    if METHODS[method][0] is None:
                        row = training_free(args.model, shots, seed)
                    else:
                        row = trained(args.model, method, shots, seed, args.steps, runs)
                    record["few_shot"].append({"method": method, "shots": shots, "seed": seed, **row})
                    print(f"{method} {shots} shots seed {seed}: {row['top1']:.1f}", flush=True)
                record["minutes"] = record["minutes"] + (time.time() - start) / 60
                start = time.time()
                write(record, args.out)
    print(write(record, args.out))
    return 0
