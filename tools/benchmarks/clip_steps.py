"""CLIP method benchmark: each prompt learner's / adapter's training step against CoOp's, on the same open_clip model,
batch and class names.

    python tools/benchmark.py clip-steps [--model ViT-B-16 | --model checkpoints/tiny_clip] [--batch 8] [--classes 10]
                                         [--threads 1] [--rounds 2] [--steps 2]

A step is what the classification trainer runs: the classifier's logits, cross-entropy plus every attached method's
``regularization_loss`` (KgCoOp, ProGrad, PromptSRC), backward, AdamW. Every method runs in a fresh process
(``core``'s protocol: same threads, median of warm steps, process CPU time), ``--rounds`` rounds with the order
rotated, CoOp in every round; the ratio is the method's CPU time over CoOp's in the same round (median, and min /
median / max over rounds). Weights do not change the cost: a named architecture is built with random weights, a
folder with its own. Tip-Adapter-F's cache holds one key per class and shot (``--shots``), as a 16-shot run's.

Cost: a text-side learner runs the text tower on one prompt per class every step, CoCoOp on one per class and image
(batch x classes prompts), so the table's CPU time grows with ``--classes``: on ViT-B/16, one thread, batch 8, a
round is about 7 CPU minutes at 10 classes, where CoOp's step takes 7.5 s; at 100 classes CoOp's step takes about
30 s and CoCoOp's runs the text tower on 800 prompts. Each run prints a progress line (its step time, its process's
wall and CPU seconds) to stderr as it finishes; the table follows the last round.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time

from .stats import ratio_spread

#: (label, method, options): each method's default (official) settings
METHODS: list[tuple[str, str, dict]] = [
    ("coop", "coop", {"n_ctx": 16}),
    ("cocoop", "cocoop", {"n_ctx": 4, "ctx_init": "a photo of a"}),
    ("kgcoop", "kgcoop", {}),
    ("prograd", "prograd", {}),
    ("maple", "maple", {}),
    ("ivlp", "ivlp", {}),
    ("promptsrc", "promptsrc", {}),
    ("clip_adapter", "clip_adapter", {}),
    ("tip_adapter_f", "tip_adapter_f", {}),
]


def build(model_name: str, classes: list[str], method: str, options: dict, shots: int):
    """The CLIP classifier of ``model_name`` (an open_clip architecture or folder) with ``method`` attached."""
    import open_clip
    import torch
    from omegaconf import OmegaConf

    import visionpeft as vp
    from visionpeft.adapter import methods_of
    from visionpeft.backbones.factory import create_open_clip
    from visionpeft.config.classification import ModelConfig
    from visionpeft.tasks.clip_classifier import CLIPClassifier

    named = model_name in open_clip.list_models()  # an architecture: random weights (the cost is the same)
    cfg = {"library": "open_clip", "name": model_name, "pretrained": not named}
    clip = create_open_clip(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg))
    depth = min(9, len(clip.visual.transformer.resblocks))  # the official depth 9, at most the tower's blocks
    if method == "maple":
        options = {"prompt_depth": depth, **options}
    if method in ("ivlp", "promptsrc"):
        options = {"prompt_depth_text": depth, "prompt_depth_vision": depth, **options}
    classifier = vp.attach(CLIPClassifier(clip, classes), method, classnames=classes, **options)
    for fitted in methods_of(classifier):
        if "fit_training_set" in fitted.provides:  # a cache of shots x classes random keys, as a built one
            keys = torch.nn.functional.normalize(torch.randn(shots * len(classes), fitted.backbone.embed_dim), dim=-1)
            fitted.set_cache(keys, torch.arange(len(classes)).repeat(shots))
    return classifier


def train_steps(args: tuple) -> dict:
    """Runs in a fresh process: build, attach, time warm AdamW steps of the trainer's loss."""
    model_name, method, options, batch, classes, shots, steps, warmup, threads = args
    import torch
    import torch.nn.functional as F

    import visionpeft as vp
    from visionpeft.adapter import methods_of

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    names = [f"class number {i}" for i in range(classes)]
    classifier = build(model_name, names, method, options, shots)
    vp.set_train_mode(classifier, True)
    regularizers = [m for m in methods_of(classifier) if "regularization_loss" in m.provides]
    params = [p for _, p in vp.trainable_parameters(classifier)]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    size = classifier.clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))
    cpu_times = []
    for step in range(warmup + steps):
        start = time.process_time()
        logits = classifier(x)
        loss = F.cross_entropy(logits, y)
        for method_ in regularizers:
            loss = loss + method_.regularization_loss(logits, (x, y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= warmup:
            cpu_times.append(time.process_time() - start)
    return {"cpu": statistics.median(cpu_times), "trainable": vp.count_parameters(classifier)["trainable"]}


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished child processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py clip-steps", description=__doc__)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random weights) or folder")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=10, help="class names (text-side cost grows with them)")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the whole table, order rotated each round")
    parser.add_argument("--methods", nargs="+", default=[label for label, *_ in METHODS])
    args = parser.parse_args(argv)
    methods = [m for m in METHODS if m[0] in args.methods or m[0] == "coop"]
    print(
        f"# {args.model}, batch {args.batch}, {args.classes} classes, fp32, AdamW, {args.threads} threads, median of "
        f"{args.steps} warm steps, one fresh process per method and round, {args.rounds} rotated rounds\n"
    )
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {label: [] for label, *_ in methods}
    for round_index in range(args.rounds):
        shift = round_index % len(methods)
        for label, method, options in methods[shift:] + methods[:shift]:
            job = (args.model, method, options, args.batch, args.classes, args.shots, args.steps, args.warmup)
            started, cpu_started = time.perf_counter(), children_cpu()
            with ctx.Pool(1) as pool:
                runs[label].append(pool.apply(train_steps, ((*job, args.threads),)))
            print(
                f"round {round_index + 1}/{args.rounds} {label}: step CPU {runs[label][-1]['cpu']:.2f} s, process "
                f"{time.perf_counter() - started:.0f} s wall / {children_cpu() - cpu_started:.0f} s CPU",
                file=sys.stderr,
                flush=True,
            )
    coop = runs["coop"]
    print("| method | trainable params | step CPU (s) | time / CoOp | min / median / max over rounds |")
    print("|---|---:|---:|---:|---:|")
    for label, *_ in methods:
        cpu = statistics.median(r["cpu"] for r in runs[label])
        ratio = statistics.median(r["cpu"] / c["cpu"] for r, c in zip(runs[label], coop))
        print(
            f"| {label} | {int(runs[label][0]['trainable']):,} | {cpu:.3f} | {ratio:.2f} | "
            f"{ratio_spread(runs[label], coop, 'cpu')} |"
        )
    return 0
