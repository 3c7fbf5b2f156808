"""Semantic segmentation metrics as mmsegmentation computes them: mIoU, aAcc and mAcc over a whole dataset.

One confusion matrix (rows: true class, columns: predicted class) is summed over every pixel of every image whose
target is not the ignore index; the metrics come from it at the end, never per image:

* ``IoU_c = n_cc / (sum_k n_ck + sum_k n_kc - n_cc)``; NaN when class c is absent from both targets and
  predictions (0 / 0). A class that is predicted but never true gets IoU 0 and counts.
* ``Acc_c = n_cc / sum_k n_ck`` (recall); NaN when c is absent from the targets, even if it is predicted.
* ``mIoU`` / ``mAcc``: the mean over the classes whose value is not NaN (mmseg's ``np.nanmean``);
  ``aAcc = sum_c n_cc / sum n`` (pixel accuracy). All in percent, as mmseg reports them (mmseg also rounds to two
  decimals; these are not rounded).

Agreement with torchmetrics (tested on a toy with an absent class, a predicted-but-absent class and ignored pixels):

* ``MulticlassJaccardIndex(num_classes, average="macro", ignore_index=255)``, accumulated over the dataset, gives the
  same mIoU (as a fraction): it drops ignored pixels and gives weight 0 to classes absent from both targets and
  predictions. Its per-class values (``average="none"``) differ for those absent classes: 0 (``zero_division``)
  where this module and mmseg give NaN.
* ``MulticlassAccuracy(average="macro", ignore_index=255)`` is not mAcc: a class that is predicted but absent from
  the targets counts there with accuracy 0, while mmseg leaves it out (NaN).
* ``torchmetrics.segmentation.MeanIoU`` averages per-image IoUs over images and has no ignore index: another number.

Distributed evaluation: the confusion matrix is a torchmetrics state declared with ``dist_reduce_fx="sum"``, so
``compute()`` first sums it over all processes (each process updates with its own images), then derives the
metrics from the global matrix (tested with a two-process gloo group).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_confusion_matrix


class SegmentationMetrics(Metric):
    """mIoU / aAcc / mAcc (percent) and per-class IoU / accuracy from one dataset-wide confusion matrix.

    Every update checks that predictions are class indices and targets class indices or the ignore index (one
    device sync per update on GPU): torchmetrics' confusion matrix would count an out-of-range prediction in
    another cell without a word.

    Args:
        num_classes: Number of classes; predictions and non-ignored targets are in ``0 .. num_classes - 1``.
        ignore_index: Target value of pixels left out (their predictions too).
        kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``, ``process_group``, ...).
    """

    full_state_update = False
    higher_is_better = True
    confusion: torch.Tensor

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.add_state("confusion", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, preds: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor | Sequence[torch.Tensor]
    ) -> None:
        """Adds images to the matrix.

        Args:
            preds: Predicted class indices, (B, H, W) or (H, W), or a list of such tensors (images of different
                sizes).
            target: True class indices (``ignore_index`` on ignored pixels), shaped like ``preds``.
        """
        if isinstance(preds, torch.Tensor) != isinstance(target, torch.Tensor):
            raise ValueError("preds and target must both be tensors or both be lists of tensors")
        pairs = [(preds, target)] if isinstance(preds, torch.Tensor) else list(zip(preds, target, strict=True))
        for pred, true in pairs:
            if pred.shape != true.shape:
                raise ValueError(f"a prediction of shape {tuple(pred.shape)} for a target of {tuple(true.shape)}")
            if pred.is_floating_point() or true.is_floating_point():
                raise ValueError("preds and target must hold class indices (integer tensors), not scores")
            pred, true = pred.reshape(-1).long(), true.reshape(-1).long()
            outside = (pred < 0) | (pred >= self.num_classes)
            outside |= (true != self.ignore_index) & ((true < 0) | (true >= self.num_classes))
            if bool(outside.any()):
                raise ValueError(f"values outside 0..{self.num_classes - 1} (targets may also be {self.ignore_index})")
            self.confusion += multiclass_confusion_matrix(
                pred, true, self.num_classes, ignore_index=self.ignore_index, validate_args=False
            )

    def compute(self) -> dict[str, float | list[float]]:
        """``{"mIoU", "aAcc", "mAcc"}`` in percent and ``per_class_iou`` / ``per_class_acc`` lists in percent
        (NaN for the classes left out of the means)."""
        return metrics_from_confusion(self.confusion)


def metrics_from_confusion(confusion: torch.Tensor) -> dict[str, float | list[float]]:
    """The metrics of a (num_classes, num_classes) confusion matrix (rows true, columns predicted); see the module
    docstring for the definitions."""
    counts = confusion.double()
    hits = counts.diagonal()
    true_area, predicted_area = counts.sum(1), counts.sum(0)
    iou = hits / (true_area + predicted_area - hits)  # 0 / 0 = NaN: absent from both
    acc = hits / true_area  # NaN: absent from the targets
    total = true_area.sum()
    return {
        "mIoU": float(iou.nanmean()) * 100,
        "aAcc": float(hits.sum() / total) * 100 if total > 0 else math.nan,
        "mAcc": float(acc.nanmean()) * 100,
        "per_class_iou": (iou * 100).tolist(),
        "per_class_acc": (acc * 100).tolist(),
    }


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def per_class_table(result: dict[str, float | list[float]], classes: Sequence[str]) -> str:
    """A markdown table of ``result`` (from :meth:`SegmentationMetrics.compute`): one row per class (IoU and
    accuracy in percent, ``-`` where the class is left out of the means), then the means."""
    ious, accs = result["per_class_iou"], result["per_class_acc"]
    if len(classes) != len(ious):
        raise ValueError(f"{len(classes)} class names for {len(ious)} classes")
    lines = ["| class | IoU | Acc |", "|---|---:|---:|"]
    lines += [f"| {name} | {_cell(iou)} | {_cell(acc)} |" for name, iou, acc in zip(classes, ious, accs)]
    lines.append(f"| **mean** | **{_cell(result['mIoU'])}** | **{_cell(result['mAcc'])}** |")
    lines.append(f"| aAcc | {_cell(result['aAcc'])} | |")
    return "\n".join(lines)
