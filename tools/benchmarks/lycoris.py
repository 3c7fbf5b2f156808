"""LyCORIS-family benchmark ([lycoris]): a training step of visionpeft's loha, lokr, oft, boft and ia3 against PEFT's
same config on the same timm ViT, batch and threads.

For each method both models are built in one fresh process (same weights, the adapter on the same whole modules:
``target_modules`` of PEFT's layout, plus the head) and their AdamW steps are timed interleaved (``core.interleaved``:
alternating rounds, medians), so a drift of the shared machine hits both alike. The ratio is ours / PEFT's.
``--clock cpu`` times this process's CPU time instead of wall time: with ``--threads 1`` on a machine others load,
the waits for a core are left out.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

from .core import Settings, build_model, interleaved, training_step

#: (label, method, visionpeft options, PEFT config class, PEFT options); both adapt the same whole modules
METHODS: list[tuple[str, str, dict, str, dict]] = [
    ("loha r8 qkv", "loha", {"r": 8, "alpha": 8}, "LoHaConfig", {"r": 8, "alpha": 8}),
    ("lokr r8 qkv", "lokr", {"r": 8, "alpha": 8}, "LoKrConfig", {"r": 8, "alpha": 8}),
    ("oft block 32 qkv", "oft", {"oft_block_size": 32}, "OFTConfig", {"oft_block_size": 32, "r": 0}),
    ("boft block 4 qkv", "boft", {"boft_block_size": 4}, "BOFTConfig", {"boft_block_size": 4}),
    ("ia3 qkv, fc2 (ff)", "ia3", {"feedforward_modules": ["fc2"]}, "IA3Config", {"feedforward_modules": ["fc2"]}),
]
TARGET_MODULES = {"ia3": ["qkv", "fc2"]}
TARGET = 1.05


def _peft_model(settings: Settings, config_class: str, options: dict, targets: list[str]):
    import peft

    config = getattr(peft, config_class)(target_modules=targets, modules_to_save=["head"], **options)
    return peft.get_peft_model(build_model(settings), config)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def ours_vs_peft(settings: Settings, entry: tuple, repeats: int, clock: str = "wall") -> dict:
    """Runs in a fresh process: one method's training step, ours and PEFT's, interleaved."""
    import torch

    import visionpeft as vp

    label, method, options, config_class, peft_options = entry
    torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    targets = TARGET_MODULES.get(method, ["qkv"])
    ours = vp.attach(build_model(settings), method, target_modules=targets, **options)
    vp.set_train_mode(ours, True)
    peer = _peft_model(settings, config_class, peft_options, targets)
    peer.train()
    x = torch.randn(settings.batch, 3, settings.img, settings.img)
    y = torch.randint(0, 100, (settings.batch,))
    params = {
        "ours": [p for _, p in vp.trainable_parameters(ours)],
        "peft": [p for p in peer.parameters() if p.requires_grad],
    }
    steps = {
        "ours": training_step(ours, params["ours"], x, y),
        "peft": training_step(peer, params["peft"], x, y),
    }
    times = interleaved(steps, 1, rounds=repeats, clock=CLOCKS[clock])
    return {**times, "trainable": {k: sum(p.numel() for p in v) for k, v in params.items()}}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py lycoris", description=__doc__)
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per method (one step each)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time or this process's CPU time")
    parser.add_argument("--quick", action="store_true", help="a tiny ViT, for a smoke test of this script")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.batch, args.img, args.rounds = "vit_tiny_patch16_224", 2, 64, 2
    settings = Settings(args.arch, args.batch, args.img, 1, 1, args.threads)
    print(
        f"# {settings.arch}, batch {settings.batch}, {settings.img} px, fp32, AdamW, {settings.threads} threads, "
        f"median {args.clock} time of {args.rounds} interleaved steps (order rotated each round), one fresh process "
        "per method\n"
    )
    print("| method | trainable (ours / PEFT) | ours step (s) | PEFT step (s) | ours / PEFT | target |")
    print("|---|---:|---:|---:|---:|---:|")
    ctx = mp.get_context("spawn")
    for entry in METHODS:
        with ctx.Pool(1) as pool:
            r = pool.apply(ours_vs_peft, (settings, entry, args.rounds, args.clock))
        counts = f"{r['trainable']['ours']:,} / {r['trainable']['peft']:,}"
        print(
            f"| {entry[0]} | {counts} | {r['ours']:.3f} | {r['peft']:.3f} | {r['ours'] / r['peft']:.2f} | "
            f"<= {TARGET:.2f} |",
            flush=True,
        )
    return 0
