"""Benchmarks that print tables: ``python tools/benchmark.py SUITE [options]``, SUITE one of those below.

core  training-step time and peak memory of every method relative to full fine-tuning (ViT-B/16), a LoRA Linear
      against PEFT's, and a merged model's inference time against the plain model's.
zoo   [zoo] methods (ln_tune, ssf, fact, repadapter, adapter, vqt, vp): step time against full fine-tuning over
      rotated rounds, and merged SSF / FacT / RepAdapter inference against the plain model.
lycoris  loha / lokr / oft / boft / ia3 training steps against PEFT's same config, interleaved in one process.
demo  the sweep spec grids/demo.yaml (every method on the tiny ViT and the mini tasks) run by tools/sweep.py;
      the report goes to gallery/.
noah-demo  NOAH on the mini tasks: per task the supernet, the evolutionary search and the retrain of the found
      subnet (seeds 0 1 2); its row goes to gallery/demo_noah_results.{md,json}.
clip  learned-prompt (CoOp) inference throughput against zero-shot CLIP.
personalize  one training step of textual inversion / DreamBooth-LoRA against a bare diffusers reference step.
cli   how fast the commands answer (--help, config errors) and import visionpeft, against import torch.
control  a ControlNet training step against diffusers' train_controlnet.py step; ControlNet-LoRA / T2I-Adapter.
segment  segmentation training-step time and memory of every method relative to full fine-tuning; sliding-window
      inference throughput relative to whole-image.
segment-demo  every method on the tiny ViT and the texture mosaic (mIoU table + prediction picture in gallery/).
diffusion-demo  the embedded tiny text-to-image pipeline: base samples judged, personalization before / after
      (gallery/diffusion/).
recipes-ablation  DreamBooth-LoRA on the tiny pipeline's held-out 7 with each training knob on (min-SNR, noise
      offset, Huber, masked loss, pivotal tuning, buckets, prior preservation): the judge's rate and language drift
      over 3 seeds (gallery/diffusion/ablation.md).
tiny-sd  the tiny pipeline's sampling speed, and its personalization step against the bare diffusers + peft step.
control-demo  ControlNet / ControlNet-LoRA on the tiny pipeline and 32 px fill50k: held-out fill IoU over training
      steps against the base pipeline, sample grids (gallery/control/).
ip-adapter-demo  IP-Adapter / IP-Adapter-plus on the tiny pipeline: the judge's rate of the reference image's digit with
      the image prompt against the text alone (gallery/control/ip_adapter/).
clip-demo  the embedded tiny CLIP: zero-shot (held-in / held-out classes) against CoOp / CoCoOp / KgCoOp / MaPLe /
      Tip-Adapter, few-shot curves and the base-to-new table (gallery/clip/).
clip-steps  each CLIP prompt learner's / adapter's training step (KgCoOp, ProGrad, MaPLe, IVLP, PromptSRC,
      CLIP-Adapter, Tip-Adapter-F, CoCoOp) against CoOp's, same model and batch.
gpu   CUDA bf16 / fp16 tables: ViT-B/16 batch 64 (visionpeft vs PEFT LoRA, full, adapters) and the SD 1.5 layout at
      512 px (DreamBooth-LoRA / textual inversion vs diffusers' example loops, SDPA and xformers attention).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

SUITES = (
    "core",
    "zoo",
    "lycoris",
    "demo",
    "noah-demo",
    "clip",
    "personalize",
    "cli",
    "control",
    "segment",
    "segment-demo",
    "diffusion-demo",
    "recipes-ablation",
    "tiny-sd",
    "control-demo",
    "ip-adapter-demo",
    "clip-demo",
    "clip-steps",
    "gpu",
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown benchmark '{argv[0]}'; choose one of: {', '.join(SUITES)}", file=sys.stderr)
            return 2
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    module = importlib.import_module(f"benchmarks.{argv[0].replace('-', '_')}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
