"""Core benchmark: cost of each method's training step relative to full fine-tuning, measured side by side.

Every method runs in its own fresh process (so peak memory is its own), on the same model shape, batch and
thread count; the table reports median warm step time and peak resident memory divided by full fine-tuning's.
Memory is the process's peak RSS during training above its RSS once the model is built (activations, gradients,
optimizer state) - the part a method can change. Both wall-clock and process CPU time are reported; on a shared
machine CPU time is the steadier of the two, so the ratios use it. ``--rounds`` repeats the whole table in a
rotated order and takes the median per method, so a burst of load elsewhere does not land on one method.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import resource
import statistics
import time
from dataclasses import dataclass

from .stats import ratio_spread

METHODS: list[tuple[str, str, dict]] = [
    ("full", "full", {}),
    ("linear", "linear", {}),
    ("bitfit", "bitfit", {}),
    ("difffit", "difffit", {}),
    ("lora r8 q,v", "lora", {"r": 8}),
    ("peft lora r8 qkv (peer)", "peft_lora", {"r": 8}),
    ("adaptformer b8", "adaptformer", {"bottleneck": 8}),
    ("convpass d8", "convpass", {"dim": 8, "scale": 0.1}),
    ("vpt-deep 10", "vpt", {"num_tokens": 10, "deep": True}),
    ("vpt-shallow 10", "vpt", {"num_tokens": 10}),
]
TARGETS = {
    "linear": 0.35,
    "bitfit": 0.70,
    "difffit": 0.70,
    "lora r8 q,v": 0.70,
    "adaptformer b8": 0.70,
    "convpass d8": 0.80,
    "vpt-deep 10": 0.80,
}


@dataclass
class Settings:
    arch: str
    batch: int
    img: int
    steps: int
    warmup: int
    threads: int


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def build_model(settings: Settings, num_classes: int = 100):
    import timm

    return timm.create_model(settings.arch, pretrained=False, num_classes=num_classes, img_size=settings.img)


#: peers written with plain PyTorch ``requires_grad`` flags: every parameter trained (full fine-tuning without
#: visionpeft), or the biases and the head (BitFit without visionpeft)
PLAIN = {"plain": lambda name: True, "plain_bias": lambda name: name.endswith("bias") or name.startswith("head.")}


def prepare(model, method: str, options: dict):
    """``model`` with ``method`` attached, in training mode -> (model, trained parameters, trainable count).
    ``peft_lora`` is the peer PEFT users write (LoRA on timm's fused qkv plus the head); :data:`PLAIN` names the
    plain-PyTorch peers."""
    import visionpeft as vp

    if method in PLAIN or method == "peft_lora":
        if method == "peft_lora":
            import peft

            config = peft.LoraConfig(
                r=options["r"], lora_alpha=options["r"], target_modules=["qkv"], modules_to_save=["head"]
            )
            model = peft.get_peft_model(model, config)
        else:
            for name, p in model.named_parameters():
                p.requires_grad_(PLAIN[method](name))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        return model, params, sum(p.numel() for p in params)
    model = vp.attach(model, method, **options)
    vp.set_train_mode(model, True)
    return model, [p for _, p in vp.trainable_parameters(model)], vp.count_parameters(model)["trainable"]


def training_step(model, params, x, y, amp=None):
    """One AdamW step of cross-entropy on ``(x, y)``, as a closure (``amp``: mixed precision, default none)."""
    import torch
    import torch.nn.functional as F

    from .amp import Amp

    amp = amp or Amp(x.device)
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with amp.autocast():
            loss = F.cross_entropy(model(x), y)
        amp.step(loss, optimizer)

    return step


def train_steps(args: tuple) -> dict:
    """Runs in a fresh process: build, attach, time warm AdamW steps, report peak memory."""
    settings, method, options = args
    import torch

    torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    model, params, trainable = prepare(build_model(settings), method, options)
    x = torch.randn(settings.batch, 3, settings.img, settings.img)
    y = torch.randint(0, 100, (settings.batch,))
    step_once = training_step(model, params, x, y)
    gc.collect()
    base = _rss_mb()
    times, cpu_times = [], []
    for step in range(settings.warmup + settings.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step_once()
        if step >= settings.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "time": statistics.median(times),
        "cpu": statistics.median(cpu_times),
        "memory": max(peak - base, 1e-6),
        "trainable": trainable,
    }


def _median_time(fn, repeats: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int, rounds: int = 5, clock=time.perf_counter) -> dict[str, float]:
    """Median time of each function, alternating between them, the order rotated every round, so drifts of the
    machine hit all alike. ``clock``: wall time, or ``time.process_time`` (this process's CPU time: on a shared
    machine a one-thread run's CPU time leaves out the waits for a core)."""
    results: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    names = list(fns)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(_median_time(fns[name], repeats, clock))
    return {name: statistics.median(values) for name, values in results.items()}


def lora_vs_peft(settings: Settings, repeats: int, fused_qv: bool = False) -> dict[str, float]:
    """Forward + backward of one LoRA-wrapped Linear, ours against PEFT's, on the same shapes and weights.

    ``fused_qv``: the path the configs use, Q/V LoRA (r 8 each) inside timm's fused ``qkv``, against PEFT's LoRA r 8
    on the whole ``qkv`` (PEFT cannot place a LoRA on part of a fused projection).
    """
    import peft
    import torch

    from visionpeft.layers.lora import LoRALinear

    torch.set_num_threads(settings.threads)
    widths = {"base": 768, "small": 384}
    dim = next((w for key, w in widths.items() if key in settings.arch), 192)
    tokens = settings.batch * (settings.img // 16) ** 2
    out = 3 * dim if fused_qv else dim
    slices = {"q": (0, dim), "v": (2 * dim, 3 * dim)} if fused_qv else {"main": (0, dim)}
    ours = LoRALinear(torch.nn.Linear(dim, out).requires_grad_(False), slices, r=8, alpha=8, dropout=0.0)
    holder = torch.nn.Sequential(torch.nn.Linear(dim, out)).requires_grad_(False)
    theirs = peft.get_peft_model(holder, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["0"]))
    x = torch.randn(tokens, dim, requires_grad=True)

    def step(layer):
        def run():
            layer(x).sum().backward()

        return run

    return interleaved({"ours": step(ours), "peft": step(theirs)}, repeats)


def bias_steps(settings: Settings, repeats: int) -> dict[str, float]:
    """Whole training steps in one process, interleaved: visionpeft's BitFit and DiffFit against the same step
    written with plain ``requires_grad`` flags (biases + head) and against full fine-tuning, so a bias method's
    ratio to full can be told apart from overhead of its own."""
    import torch

    torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    x = torch.randn(settings.batch, 3, settings.img, settings.img)
    y = torch.randint(0, 100, (settings.batch,))
    rows = {"full": "full", "plain bias-only": "plain_bias", "bitfit": "bitfit", "difffit": "difffit"}
    steps = {}
    for label, method in rows.items():
        model, params, _ = prepare(build_model(settings), method, {})
        steps[label] = training_step(model, params, x, y)
    return interleaved(steps, 1, rounds=repeats)


def merged_inference(settings: Settings, repeats: int) -> dict[str, float]:
    """Inference time of a model with a merged LoRA against the plain model."""
    import torch

    import visionpeft as vp

    torch.set_num_threads(settings.threads)
    plain = build_model(settings).eval()
    merged = build_model(settings).eval()
    vp.attach(merged, "lora", r=8, targets=["q", "k", "v", "o", "fc1", "fc2"])
    vp.merge(merged)
    x = torch.randn(settings.batch, 3, settings.img, settings.img)

    def infer(model):
        def run():
            with torch.inference_mode():
                model(x)

        return run

    return interleaved({"plain": infer(plain), "merged": infer(merged)}, repeats)


def lora_scaling(args) -> int:
    """LoRA r 8 on Q/V (ours) against PEFT's LoRA r 8 on qkv and against full fine-tuning, per model and batch, each
    in a fresh process, ``--rounds`` rotated rounds, medians."""
    trio = [("full", "full", {}), ("lora", "lora", {"r": 8}), ("peft", "peft_lora", {"r": 8})]
    print(
        f"# {args.img} px, fp32, AdamW, {args.threads} threads, median of {args.steps} warm steps x {args.rounds} "
        "rounds, one fresh process per run\n"
    )
    print(
        "| model | batch | full step CPU (s) | lora / full | lora / peft (time) | min / median / max over rounds "
        "| lora / peft (memory) | target |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    ctx = mp.get_context("spawn")
    for arch in args.archs:
        for batch in args.batches:
            settings = Settings(arch, batch, args.img, args.steps, args.warmup, args.threads)
            runs: dict[str, list[dict]] = {label: [] for label, _, _ in trio}
            for round_index in range(args.rounds):
                shift = round_index % len(trio)
                for label, method, options in trio[shift:] + trio[:shift]:
                    with ctx.Pool(1) as pool:
                        runs[label].append(pool.apply(train_steps, ((settings, method, options),)))
            r = {k: {key: statistics.median(x[key] for x in v) for key in v[0]} for k, v in runs.items()}
            print(
                f"| {arch} | {batch} | {r['full']['cpu']:.2f} | {r['lora']['cpu'] / r['full']['cpu']:.2f} | "
                f"{r['lora']['cpu'] / r['peft']['cpu']:.2f} | {ratio_spread(runs['lora'], runs['peft'], 'cpu')} | "
                f"{r['lora']['memory'] / r['peft']['memory']:.2f} | "
                "<= 1.00 vs peft |"
            )
    return 0


def add_step_arguments(parser: argparse.ArgumentParser, arch: str = "vit_base_patch16_224") -> None:
    """The model and step settings of a training-step table (``Settings``), shared by the suites that time steps."""
    parser.add_argument("--arch", default=arch)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="timed warm steps per method (and round)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny ViT, for a smoke test of this script")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py core", description=__doc__)
    add_step_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5, help="runs per round in the micro-benchmarks")
    parser.add_argument("--rounds", type=int, default=2, help="repeats of the whole method table")
    parser.add_argument(
        "--lora-scaling",
        action="store_true",
        help="only the table of LoRA (Q/V) vs PEFT LoRA and vs full, --archs x --batches",
    )
    parser.add_argument(
        "--archs", nargs="+", default=["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    args = parser.parse_args(argv)
    if args.lora_scaling:
        return lora_scaling(args)
    if args.quick:
        args.arch, args.batch, args.img, args.steps, args.repeats, args.rounds = "vit_tiny_patch16_224", 2, 64, 1, 1, 1
    settings = Settings(args.arch, args.batch, args.img, args.steps, args.warmup, args.threads)
    print(
        f"# {settings.arch}, batch {settings.batch}, {settings.img} px, fp32, AdamW, {settings.threads} threads, "
        f"median of {settings.steps} warm steps, one fresh process per method\n"
    )
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in METHODS}
    for round_index in range(args.rounds):
        shift = round_index % len(METHODS)
        for label, method, options in METHODS[shift:] + METHODS[:shift]:
            with ctx.Pool(1) as pool:
                runs[label].append(pool.apply(train_steps, ((settings, method, options),)))
    rows = {
        label: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for label, results in runs.items()
    }
    full = rows["full"]
    print(
        "| method | trainable params | step wall (s) | step CPU (s) | time / full | target | train memory (MB) "
        "| memory / full |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        target = f"<= {TARGETS[label]:.2f}" if label in TARGETS else ""
        print(
            f"| {label} | {int(r['trainable']):,} | {r['time']:.2f} | {r['cpu']:.2f} | {r['cpu'] / full['cpu']:.2f} | "
            f"{target} | {r['memory']:.0f} | {r['memory'] / full['memory']:.2f} |"
        )
    with ctx.Pool(1) as pool:
        lora = pool.apply(lora_vs_peft, (settings, args.repeats))
        qv = pool.apply(lora_vs_peft, (settings, args.repeats, True))
        merged = pool.apply(merged_inference, (settings, args.repeats))
        biases = pool.apply(bias_steps, (settings, args.repeats))
    print("\n| micro-benchmark | ours (ms) | reference (ms) | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| LoRA Linear fwd+bwd vs PEFT LoRA Linear | {lora['ours'] * 1e3:.2f} | {lora['peft'] * 1e3:.2f} | "
        f"{lora['ours'] / lora['peft']:.2f} | <= 1.00 |"
    )
    print(
        f"| Q/V LoRA in fused qkv fwd+bwd vs PEFT LoRA on qkv | {qv['ours'] * 1e3:.2f} | {qv['peft'] * 1e3:.2f} | "
        f"{qv['ours'] / qv['peft']:.2f} | <= 1.00 |"
    )
    print(
        f"| merged LoRA inference vs plain model | {merged['merged'] * 1e3:.1f} | {merged['plain'] * 1e3:.1f} | "
        f"{merged['merged'] / merged['plain']:.2f} | 1.00 +- 0.03 |"
    )
    print("\n| whole step, one process, interleaved | step (s) | vs full | vs plain bias-only |")
    print("|---|---:|---:|---:|")
    for kind, seconds in biases.items():
        print(
            f"| {kind} | {seconds:.2f} | {seconds / biases['full']:.2f} | {seconds / biases['plain bias-only']:.2f} |"
        )
    return 0
