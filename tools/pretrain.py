"""Pretrain one of the project's embedded models and export it as a checkpoint with a model card.

    python tools/pretrain.py configs/pretrain/tiny_vit_fractal.yaml [key=value ...] [--out checkpoints]
    python tools/pretrain.py configs/pretrain/tiny_sd.yaml [key=value ...] [--out checkpoints] [--resume]

The config's ``task`` picks what is made. ``pretrain_text_to_image`` (the tiny text-to-image pipeline) writes
``<out>/<run name>/``, a ``StableDiffusionPipeline`` folder with its model card ``README.md`` (see
``visionpeft/trainers/tiny_sd_card.py``); ``--resume`` continues an interrupted run from its saved state. With
``model.family: flux`` (``configs/pretrain/tiny_flux.yaml``) it is a ``FluxPipeline`` folder reusing the tiny SD
pipeline's VAE and CLIP (``visionpeft/demo/tiny_flux_card.py``).

For the tiny ViT, training is the ordinary classification trainer (method ``full`` from scratch on FractalDB-style
images); this tool then writes ``<out>/<run name>.safetensors`` (fp16 weights of the whole model) and
``<out>/<run name>.md``, a model card with the command, the accuracy on held-out fractal instances, the training
time and the sha256.

``pretrain_clip`` (the tiny CLIP) writes ``<out>/<run name>/``, an open_clip folder (``open_clip_config.json`` +
``open_clip_model.safetensors``, fp16) with its model card ``README.md`` and ``training.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from visionpeft.cli.common import run


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", type=Path, default=Path("checkpoints"))
    parser.add_argument("--resume", action="store_true", help="continue the run from its saved state")
    parser.add_argument("--export-only", action="store_true", help="skip training: export the finished run again")
    args = parser.parse_args(argv)
    from visionpeft.config import load_config

    config = load_config(args.config, args.overrides)
    command = " ".join(["python tools/pretrain.py", args.config, *args.overrides])
    if config.task == "pretrain_text_to_image":
        return text_to_image(config, args, command)
    if config.task == "pretrain_clip":
        return tiny_clip(config, args, command)
    if config.data.name == "captioned_mix":
        return judge(config, args, command)
    return tiny_vit(config, args, command)


def text_to_image(config, args: argparse.Namespace, command: str) -> int:
    """Pretrains the tiny text-to-image pipeline and copies it with its model card into ``<out>/<run name>``."""
    from visionpeft.cli.common import configure_logging
    from visionpeft.demo.pretrain_text_to_image import run as train
    from visionpeft.demo.tiny_sd_card import export_pipeline

    configure_logging()
    run_dir = Path(config.train.output_dir) / config.train.run_name
    start = time.time()
    if not args.export_only:
        trains_vae = (
            config.model.family != "flux"
            and not config.model.init_from
            and not (run_dir / "vae" / "training.json").exists()
        )
        results = train(config, run_dir, resume=args.resume)
        add_minutes(run_dir, (time.time() - start) / 60, includes_vae=trains_vae)
        if "outputs" not in results:
            print(f"stopped before the last step; continue with --resume ({run_dir})")
            return 1
    if config.model.family == "flux":
        from visionpeft.demo.tiny_flux_card import export_flux_pipeline as export_pipeline
    target = export_pipeline(config, run_dir, args.out / config.train.run_name, command)
    print(f"wrote {target} (model card {target / 'README.md'})")
    return 0


def tiny_clip(config, args: argparse.Namespace, command: str) -> int:
    """Pretrains the tiny CLIP and writes ``<out>/<run name>/``, an open_clip folder (fp16 weights,
    ``open_clip_config.json``) with its model card ``README.md`` and ``training.json`` (see
    ``visionpeft/demo/tiny_clip_card.py``)."""
    from visionpeft.cli.common import configure_logging
    from visionpeft.demo.pretrain_clip import run as train

    configure_logging()
    run_dir = Path(config.train.output_dir) / config.train.run_name
    if not args.export_only:
        start = time.time()
        results = train(config, run_dir, resume=args.resume)
        add_minutes(run_dir, (time.time() - start) / 60)
        if "outputs" not in results:
            print(f"stopped before the last step; continue with --resume ({run_dir})")
            return 1
    from visionpeft.demo.tiny_clip_card import export_clip

    target = export_clip(config, run_dir, args.out / config.train.run_name, command)
    print(f"wrote {target} (model card {target / 'README.md'})")
    return 0


def add_minutes(run_dir: Path, minutes: float, includes_vae: bool = False) -> float:
    """Adds this session's wall time to the run's total (a resumed run is timed over all its sessions);
    ``includes_vae``: this session trained the VAE stage (otherwise its time is only in ``vae/training.json``)."""
    import torch

    record = run_dir / "wall_minutes.json"
    old = json.loads(record.read_text()) if record.exists() else {"minutes": 0.0}
    total = old["minutes"] + minutes
    flag = bool(old.get("includes_vae")) or includes_vae
    # the CPU threads of the training process (an --export-only process may have others)
    record.write_text(json.dumps({"minutes": total, "includes_vae": flag, "threads": torch.get_num_threads()}) + "\n")
    return total


def judge(config, args: argparse.Namespace, command: str) -> int:
    """Fine-tunes the tiny ViT into the judge of the tiny text-to-image pipeline's images (every subject of the
    captioned mix, held-out ones included); writes ``<out>/<run name>.safetensors`` (fp16, self-describing
    metadata, the test accuracy included) and ``<out>/<run name>.md``."""
    import torch
    from safetensors.torch import save_file

    import visionpeft as vp
    from visionpeft.data.transforms import normalization_of
    from visionpeft.demo.captioned_mix import captioned_mix
    from visionpeft.demo.judge import Judge
    from visionpeft.io import atomic_write
    from visionpeft.trainers.classification import build_experiment
    from visionpeft.trainers.classification import run as train

    run_dir = Path(config.train.output_dir) / config.train.run_name
    start = time.time()
    if not args.export_only:
        train(config, run_dir)
        add_minutes(run_dir, (time.time() - start) / 60)
    minutes = json.loads((run_dir / "wall_minutes.json").read_text())["minutes"]
    experiment = build_experiment(config)
    model = experiment.model
    vp.detach(model)
    vp.load_adapter(model, run_dir / "best")
    vp.merge(model)
    model.eval()
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    mean, std = normalization_of(model)
    arch = {"name": config.model.name, "img_size": config.model.img_size, "kwargs": dict(config.model.kwargs)}
    metadata = {
        "format": "pt",
        "classes": json.dumps(experiment.classes),
        "model": json.dumps(arch),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
    }
    name = config.train.run_name
    weights = args.out / f"{name}.safetensors"
    atomic_write(weights, lambda tmp: save_file(state, tmp, metadata=metadata))
    # the accuracy of the file as shipped (fp16 weights), on the fixed test split
    test = captioned_mix("test", **{**dict(config.data.options), "exclude": ()})
    scorer = Judge.load(weights)
    predicted = scorer.logits(test.images).argmax(-1).numpy()
    labels = np.array(test.targets)
    accuracy = float((predicted == labels).mean())
    metadata["test_accuracy"] = json.dumps(accuracy)
    atomic_write(weights, lambda tmp: save_file(state, tmp, metadata=metadata))
    rows = []
    for family in ("digit", "texture", "face", "photo", "circle"):
        ids = [i for i, c in enumerate(scorer.classes) if c.split(" ")[0] == family]
        mask = np.isin(labels, ids)
        rows.append(f"| {family} | {int(mask.sum())} | {100 * (predicted[mask] == labels[mask]).mean():.1f} |")
    per_subject = ", ".join(
        f"{c} {100 * (predicted[labels == i] == i).mean():.0f}" for i, c in enumerate(scorer.classes)
    )
    card = f"""# {name}

The judge of the tiny text-to-image pipeline (`checkpoints/tiny_sd`): it names the subject of a 32 px image among
the {len(scorer.classes)} subjects of `visionpeft/demo/captioned_mix.py`, **held-out subjects included** (digit 7 and
the brick texture, which the pipeline never saw), so it can score base samples and personalization alike.

- **Model**: timm `{config.model.name}` at {config.model.img_size} px, {dict(config.model.kwargs)}, started from
  `checkpoints/tiny_vit_fractal.safetensors` (FractalDB-style pretraining) and fully fine-tuned
  ({config.optim.name}, lr {config.optim.lr}, {config.optim.epochs} epochs, batch {config.data.batch_size}, seed
  {config.train.seed}; the epoch with the best validation accuracy is kept).
- **Data**: the captioned mix's fixed train split ({len(experiment.train)} images); validation and test splits are
  disjoint (digits / faces per class, textures by separate bands of each photo, photo crops and circles by their own
  seeds; photo crops of one photograph may overlap across splits).
- **Test accuracy** (the shipped fp16 file, {len(labels)} test images): **{100 * accuracy:.2f}%**

| family | test images | top-1 (%) |
|---|---:|---:|
{chr(10).join(rows)}

Per subject (%): {per_subject}.

- **Training time**: {minutes:.1f} minutes on this machine's shared CPU.
- **Command**: `{command}`
- **File**: `{weights.name}` (fp16; metadata: classes, timm architecture, normalisation, test accuracy), sha256
  `{sha256(weights)}`. Load it with `visionpeft.demo.judge.Judge.load()`.

What it is: a subject classifier for 32 px images of this mix. What it is not: a general image model; images unlike
any subject (or blank) still get one of the {len(scorer.classes)} names.
"""
    atomic_write(args.out / f"{name}.md", lambda tmp: Path(tmp).write_text(card))
    print(f"wrote {weights} and {args.out / (name + '.md')} (test top-1 {100 * accuracy:.2f}%)")
    return 0


def tiny_vit(config, args: argparse.Namespace, command: str) -> int:
    """Pretrains the tiny ViT on FractalDB-style images; writes fp16 weights and a model card."""

    import torch
    from safetensors.torch import save_file

    import visionpeft as vp
    from visionpeft.io import atomic_write
    from visionpeft.trainers.classification import build_experiment
    from visionpeft.trainers.classification import run as train

    run_dir = Path(config.train.output_dir) / config.train.run_name
    start = time.time()
    results = train(config, run_dir)
    minutes = (time.time() - start) / 60
    model = build_experiment(config).model
    vp.detach(model)
    vp.load_adapter(model, run_dir / "best")
    vp.merge(model)  # full fine-tuning: the weights are the model
    name = config.train.run_name
    weights = args.out / f"{name}.safetensors"
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    accuracy = max(
        json.loads(line).get("eval/top1", 0) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    )
    params = sum(v.numel() for v in state.values())
    size = config.model.img_size
    card = f"""# {name}

A tiny Vision Transformer pretrained by visionpeft on formula-driven synthetic images, so that the embedded demo
adapts a *pretrained* backbone with no download.

- **Architecture**: timm `{config.model.name}` with `img_size={config.model.img_size}`, {dict(config.model.kwargs)}:
  {params:,} parameters, {size} x {size} RGB input, {config.data.options.categories}-way fractal classifier head.
- **Data**: {config.data.options.categories} FractalDB-style IFS categories x {config.data.options.instances} instances
  (Kataoka et al., ACCV 2020), rendered on the fly by `visionpeft/demo/fractal.py` (seed {config.data.options.seed});
  no natural image was seen.
- **Recipe**: {config.optim.name}, lr {config.optim.lr}, weight decay {config.optim.weight_decay}, {config.optim.epochs}
  epochs ({config.optim.warmup_epochs} warmup), batch {config.data.batch_size}, label smoothing
  {config.optim.label_smoothing}, seed {config.train.seed}; the best epoch on held-out instances is kept.
- **Accuracy on its own task** (top-1 on {config.data.options.val_instances} unseen instances per category):
  {100 * accuracy:.2f}%
- **Training time**: {minutes:.1f} minutes on this machine's CPU ({torch.get_num_threads()} threads).
- **Command**: `{command}`
- **File**: `{weights.name}` (fp16), sha256 `{sha256(weights)}`

What it is: a small, honest stand-in for an ImageNet-pretrained ViT that lets every method run end to end offline.
What it is not: a strong feature extractor - it has only seen synthetic shapes, at 32 pixels.
"""
    atomic_write(args.out / f"{name}.md", lambda tmp: Path(tmp).write_text(card))
    print(f"wrote {weights} and {args.out / (name + '.md')} (best held-out top-1 {100 * accuracy:.2f}%)")
    return 0 if results.get("eval") is not None else 1


if __name__ == "__main__":
    sys.exit(run(main))
