"""Zero-shot CLIP with hand-written prompts against learned prompts (CoOp / CoCoOp), in one table.

    python tools/eval_zeroshot.py --model ViT-B-32 --pretrained openai --dataset cifar100 --data-root data \\
        [--prompts runs/coop-16shot ...] [--base-to-new] [--split test] [--limit N] [--tip-adapter --shots 16]
    python tools/eval_zeroshot.py --model checkpoints/tiny_clip --dataset clip_mix [--base-to-new] [--tip-adapter]

Rows: the single template "a photo of a {}.", the 80-template OpenAI ensemble, then each run folder given with
``--prompts`` (its ``best`` or ``last`` adapter). ``--base-to-new`` reports accuracy on the base half of the
classes, the new half, and their harmonic mean (CoCoOp's protocol; learned contexts are re-used on new classes).
``--pretrained`` takes an open_clip tag or a local weights file; a randomly initialised CLIP (a baseline near
chance) is evaluated only when asked for with ``--random-weights``, and the table's header says which weights ran
and how many images were evaluated. ``--model`` also takes a local open_clip folder (``open_clip_config.json`` +
weights, as ``checkpoints/tiny_clip``), whose own weights are used without ``--pretrained``.

``--tip-adapter`` adds training-free Tip-Adapter (the ``tip_adapter`` method, which a training run refuses: it has
nothing to train): its cache holds ``--shots`` images per class of ``--train-split`` (drawn with ``--seed``, as a
training run draws them; no augmentation, so one pass), beta / alpha are searched on ``--val-split``, and it is
evaluated beside the other rows (with ``--base-to-new``: fitted on the base classes' images, new classes have no
cache, so it has a base column only).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from ..metrics.base_to_new import harmonic_mean
from .common import add_base_check_argument, configure_logging, positive_int

#: The library's advice names run-config keys; this command's flags say the same thing here.
OWN_FLAGS = {
    "set model.checkpoint=": "pass --pretrained ",
    "point data.root at": "point --data-root at",
    "set data.root": "pass --data-root",
    "set data.download=true": "pass --download",
}


def evaluate(model, loader) -> tuple[float, float]:
    """(top-1 accuracy, images per second)."""
    import torch

    correct = total = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for images, labels in loader:
            correct += int((model(images).argmax(-1) == labels).sum())
            total += labels.numel()
    return correct / max(1, total), total / (time.perf_counter() - start)


def prompt_classifier(clip, classes: list[str], run_dir: Path, check_base: bool = True):
    """A CLIPClassifier carrying the learned prompts of ``run_dir`` for ``classes``."""
    from visionpeft.checkpoint.folder import read_adapter_config
    from visionpeft.errors import CheckpointError
    from visionpeft.tasks.clip_classifier import CLIPClassifier, prompt_learning_methods
    from visionpeft.trainers.base_to_new import load_for_classes

    folder = (
        run_dir / "best"
        if (run_dir / "best").exists()
        else run_dir / "last"
        if (run_dir / "last").exists()
        else run_dir
    )
    methods = [m["name"] for m in read_adapter_config(folder)["methods"]]
    learners = prompt_learning_methods()
    if not any(m in learners for m in methods):
        raise CheckpointError(f"{folder} holds {methods}, not learned prompts ({' / '.join(learners)})")
    return load_for_classes(CLIPClassifier(clip, classes), folder, classes, check_base)


def training_free_classifier(clip, classes: list[str], method: str, train_set, val_set, seed: int, batch_size: int):
    """A CLIPClassifier with a training-free method (``tip_adapter``) fitted through the capabilities a training run
    would call: ``fit_training_set`` on ``train_set`` (items ``(image tensor, label)``), then
    ``select_on_validation`` on ``val_set``."""
    from torch.utils.data import DataLoader

    import visionpeft as vp
    from visionpeft.adapter import methods_of
    from visionpeft.tasks.clip_classifier import CLIPClassifier

    classifier = vp.attach(CLIPClassifier(clip, classes), method, classnames=classes, augment_epochs=1).eval()
    for fitted in methods_of(classifier):
        if "fit_training_set" in fitted.provides:
            fitted.fit_training_set(train_set, batch_size=batch_size, seed=seed)
        if "select_on_validation" in fitted.provides:
            fitted.select_on_validation(DataLoader(val_set, batch_size=batch_size))
    return classifier


def in_own_flags(err: Exception) -> Exception:
    """``err`` (a :class:`~visionpeft.errors.VisionPEFTError`) with its advice in this command's flags."""
    text = str(err)
    for key, flag in OWN_FLAGS.items():
        text = text.replace(key, flag)
    return type(err)(text)


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """Silences records logged on the root logger (open_clip's own ``ERROR:root: Failed to download ...``, which
    repeats the one-line error this command prints)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        root.setLevel(level)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32")
    parser.add_argument("--pretrained", default=None, help="open_clip tag (openai, laion2b_s34b_b79k) or a file")
    parser.add_argument(
        "--random-weights", action="store_true", help="evaluate a randomly initialised CLIP (no --pretrained)"
    )
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--download", action="store_true", help="let the dataset download when --data-root lacks it")
    parser.add_argument("--split", default="test")
    parser.add_argument("--prompts", type=Path, nargs="*", default=[], help="run folders with learned prompts")
    parser.add_argument("--base-to-new", action="store_true")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate on the first N images only")
    parser.add_argument("--tip-adapter", action="store_true", help="add training-free Tip-Adapter (--shots per class)")
    parser.add_argument("--shots", type=positive_int, default=16, help="Tip-Adapter's cached images per class")
    parser.add_argument("--seed", type=int, default=1, help="draw of Tip-Adapter's few-shot images")
    parser.add_argument("--train-split", default="train", help="where Tip-Adapter's few-shot images come from")
    parser.add_argument("--val-split", default="val", help="where Tip-Adapter searches beta / alpha")
    add_base_check_argument(parser)
    args = parser.parse_args(argv)
    from visionpeft.errors import ConfigError, VisionPEFTError

    folder = Path(args.model).expanduser().is_dir()  # a local open_clip folder carries its weights
    if not (folder and args.pretrained is None and not args.random_weights) and (args.pretrained is None) == (
        not args.random_weights
    ):
        raise ConfigError(
            "give --pretrained TAG_OR_FILE (e.g. openai, or a local weights file) for a pretrained CLIP, or "
            "--random-weights to evaluate a randomly initialised one"
            if args.pretrained is None
            else "--pretrained and --random-weights exclude each other"
        )
    configure_logging()

    import open_clip
    import torch
    from omegaconf import OmegaConf
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    from torch.utils.data import DataLoader, Subset

    from visionpeft.backbones.factory import create_open_clip
    from visionpeft.config.classification import ModelConfig
    from visionpeft.data.fewshot import base_new_split, few_shot
    from visionpeft.registry import DATASETS
    from visionpeft.tasks.clip_classifier import SINGLE_TEMPLATE, CLIPClassifier
    from visionpeft.trainers.classification import Transformed

    is_file = args.pretrained is not None and Path(args.pretrained).expanduser().exists()
    cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig),
        {
            "library": "open_clip",
            "name": args.model,
            "pretrained": not args.random_weights,
            "pretrained_tag": None if is_file else args.pretrained,
            "checkpoint": args.pretrained if is_file else None,
        },
    )
    options = {"download": True} if args.download else {}
    try:
        raw = DATASETS.get(args.dataset)(args.split, root=args.data_root, transform=None, **options)  # before the model
        parts = {"all": raw} if not args.base_to_new else {p: base_new_split(raw, p) for p in ("base", "new")}
        if args.tip_adapter:
            fit = {
                split: DATASETS.get(args.dataset)(split, root=args.data_root, transform=None, **options)
                for split in (args.train_split, args.val_split)
            }
            if args.base_to_new:
                fit = {split: base_new_split(data, "base") for split, data in fit.items()}
        with quiet_root_logger():
            clip = create_open_clip(cfg).eval()
    except VisionPEFTError as err:
        raise in_own_flags(err) from None
    weights = args.pretrained or ("random weights, not pretrained" if args.random_weights else "its own weights")
    visual = clip.visual
    preprocess = open_clip.image_transform(
        visual.image_size,
        is_train=False,
        mean=getattr(visual, "image_mean", None),
        std=getattr(visual, "image_std", None),
    )
    ensemble = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    counts: dict[str, int] = {}
    for part, dataset in parts.items():
        classes = list(dataset.classes)
        data = Transformed(dataset, preprocess)
        if args.limit:
            data = Subset(data, range(min(args.limit, len(data))))
        counts[part] = len(data)
        loader = DataLoader(data, batch_size=args.batch_size, num_workers=2)
        classifiers = {
            'zero-shot "a photo of a {}."': CLIPClassifier(clip, classes, SINGLE_TEMPLATE).eval(),
            f"zero-shot, {len(ensemble)}-template ensemble": CLIPClassifier(clip, classes, ensemble).eval(),
        }
        for run_dir in args.prompts:
            classifiers[f"learned: {run_dir}"] = prompt_classifier(
                clip, classes, run_dir, not args.ignore_base_mismatch
            )
        if args.tip_adapter and part != "new":
            train = few_shot(fit[args.train_split], args.shots, seed=args.seed)
            classifiers[f"Tip-Adapter (training-free, {args.shots} shots)"] = training_free_classifier(
                clip,
                classes,
                "tip_adapter",
                Transformed(train, preprocess),
                Transformed(fit[args.val_split], preprocess),
                args.seed,
                args.batch_size,
            )
        for label, classifier in classifiers.items():
            rows.setdefault(label, {})[part] = evaluate(classifier, loader)
    torch.set_printoptions(precision=4)
    title = f"{args.model} ({weights}), {args.dataset} {args.split}"
    if args.base_to_new:
        print(f"| prompts ({title}: {counts['base']} base, {counts['new']} new images) | base | new | HM | images/s |")
        print("|---|---:|---:|---:|---:|")
        for label, r in rows.items():
            base = 100 * r["base"][0]
            if "new" not in r:  # fitted to the base classes only (Tip-Adapter's cache)
                print(f"| {label} | {base:.2f} | - | - | {r['base'][1]:.1f} |")
                continue
            new = 100 * r["new"][0]
            print(f"| {label} | {base:.2f} | {new:.2f} | {harmonic_mean(base, new):.2f} | {r['base'][1]:.1f} |")
    else:
        print(f"| prompts ({title}, {counts['all']} images) | top-1 | images/s |")
        print("|---|---:|---:|")
        for label, r in rows.items():
            print(f"| {label} | {100 * r['all'][0]:.2f} | {r['all'][1]:.1f} |")
    return 0
