"""CoCoOp's base-to-new protocol, model side: a CLIP classifier trained on the base half of the classes carries its
learned prompts (and any vision-tower method) to classes it never saw, or says why it cannot.

A run with ``data.class_split=base`` is tested on the base half and, with the same adapter loaded for the new half's
class names, on the new half (``ClassificationTrainer.finish``); ``tools/eval_zeroshot.py --prompts`` loads a run's
prompts for any class names the same way (:func:`load_for_classes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..adapter import methods_of
from ..checkpoint.folder import load_adapter, read_adapter_config
from ..methods import METHODS
from ..tasks.clip_classifier import CLIPClassifier


def load_for_classes(
    classifier: CLIPClassifier, folder: Path, classes: Sequence[str], check_base: bool = True
) -> CLIPClassifier:
    """``classifier`` (a CLIP classifier over ``classes``) with the methods saved in ``folder`` loaded, every method
    that takes class names given ``classes`` instead of the ones it was trained with."""
    names = [m["name"] for m in read_adapter_config(folder)["methods"]]
    options = {
        n: {"classnames": list(classes)}
        for n in names
        if n in METHODS.names() and "classnames" in METHODS.get(n).task_inputs
    }
    load_adapter(classifier, folder, options=options, check_base=check_base)
    return classifier.eval()


def class_bound(model: Any) -> str | None:
    """Why ``model`` cannot classify classes it was not trained on (None: it can): it is not a CLIP classifier with
    text-made class weights, or a method's learned state is one entry per training class (Tip-Adapter's cache of
    the training images, CoOp's class-specific contexts)."""
    if not isinstance(model, CLIPClassifier):
        return f"a {type(model).__name__} has a weight row per training class"
    if model.head is not None:
        return "its linear head (model.clip_head=linear) has a weight row per training class"
    for method in methods_of(model):
        if "fit_training_set" in method.provides:
            return f"{method.name} keeps a cache of the training classes' images"
        if getattr(method.config, "csc", False):
            return f"{method.name} has class-specific contexts (csc), one per training class"
    return None


def tested_adapter(run_dir: Path, validated: bool) -> Path:
    """The adapter folder a finished run was tested with: ``best`` when a validation split chose one, else ``last``."""
    best = run_dir / "best"
    return best if validated and best.exists() else run_dir / "last"
