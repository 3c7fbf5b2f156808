"""CLIP prompt-learning benchmark: learned-prompt (CoOp) inference throughput against zero-shot CLIP.

Both classifiers run on the same open_clip model (random weights are fine: the cost does not depend on them) and
the same images; CoOp's class text features are computed once and cached, exactly as zero-shot's are, so the
target is a ratio of at least 0.95.
"""

from __future__ import annotations

import argparse
import time

CLASSNAMES = [f"class number {i}" for i in range(100)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py clip", description=__doc__)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import open_clip
    import torch

    import visionpeft as vp
    from visionpeft.tasks.clip_classifier import CLIPClassifier

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clip = open_clip.create_model(args.model, pretrained=None).eval()
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    zero_shot = CLIPClassifier(clip, CLASSNAMES).eval()
    learned = vp.attach(
        CLIPClassifier(open_clip.create_model(args.model).eval(), CLASSNAMES), "coop", classnames=CLASSNAMES, n_ctx=16
    ).eval()
    images = torch.randn(args.batch, 3, size, size)

    def throughput(model) -> float:
        with torch.inference_mode():
            model(images)  # builds the text cache
            start = time.perf_counter()
            for _ in range(args.batches):
                model(images)
        return args.batch * args.batches / (time.perf_counter() - start)

    results = {"zero-shot": [], "coop": []}
    for _ in range(args.rounds):  # alternate, so machine drift hits both alike
        results["zero-shot"].append(throughput(zero_shot))
        results["coop"].append(throughput(learned))
    zs, coop = (sorted(v)[len(v) // 2] for v in results.values())
    print(
        f"# {args.model}, {len(CLASSNAMES)} classes, batch {args.batch}, {args.threads} threads, median of "
        f"{args.rounds} rounds\n"
    )
    print("| classifier | images / s | ratio to zero-shot | target |")
    print("|---|---:|---:|---:|")
    print(f"| zero-shot CLIP ('a photo of a {{}}.') | {zs:.1f} | 1.00 | |")
    print(f"| CoOp (16 learned context tokens) | {coop:.1f} | {coop / zs:.2f} | >= 0.95 |")
    return 0
