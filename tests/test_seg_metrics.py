"""Segmentation metrics equal a plain numpy confusion-matrix reference (mmseg's definitions) on a toy with an absent
class, a predicted-but-absent class and ignored pixels; where torchmetrics agrees and where it does not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchmetrics.segmentation import MeanIoU

from visionpeft.metrics.segmentation import SegmentationMetrics, metrics_from_confusion, per_class_table

NUM_CLASSES = 5  # class 3: never true, never predicted; class 4: predicted, never true


def toy() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Three images of different sizes and accuracies: (predictions, targets) with ignored pixels (255)."""
    rng = np.random.default_rng(0)
    preds, targets = [], []
    for (height, width), right in [((12, 12), 0.9), ((3, 4), 0.2), ((6, 5), 0.6)]:
        target = rng.choice([0, 1, 2], size=(height, width), p=[0.5, 0.3, 0.2])
        pred = np.where(rng.random((height, width)) < right, target, rng.choice([0, 1, 2, 4], size=(height, width)))
        target[rng.random((height, width)) < 0.15] = 255
        preds.append(torch.from_numpy(pred))
        targets.append(torch.from_numpy(target))
    return preds, targets


def reference(preds: list[torch.Tensor], targets: list[torch.Tensor], num_classes: int) -> dict:
    """mmseg's metrics the long way: a numpy confusion matrix over all images, then nan-means."""
    matrix = np.zeros((num_classes, num_classes))
    for pred, target in zip(preds, targets):
        for p, t in zip(pred.numpy().ravel(), target.numpy().ravel()):
            if t != 255:
                matrix[t, p] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.diag(matrix) / (matrix.sum(0) + matrix.sum(1) - np.diag(matrix))
        acc = np.diag(matrix) / matrix.sum(1)
    return {
        "mIoU": np.nanmean(iou) * 100,
        "aAcc": np.diag(matrix).sum() / matrix.sum() * 100,
        "mAcc": np.nanmean(acc) * 100,
        "per_class_iou": iou * 100,
        "per_class_acc": acc * 100,
    }


def assert_same(result: dict, expected: dict) -> None:
    """Equal metrics, NaN where the other has NaN."""
    assert result.keys() == expected.keys()
    for key in result:
        np.testing.assert_allclose(result[key], expected[key], rtol=1e-12, equal_nan=True, err_msg=key)


def computed(preds, targets, num_classes: int = NUM_CLASSES) -> dict:
    metric = SegmentationMetrics(num_classes)
    metric.update(preds, targets)
    return metric.compute()


def test_equal_to_the_numpy_reference_with_absent_and_ignored():
    preds, targets = toy()
    result, expected = computed(preds, targets), reference(preds, targets, NUM_CLASSES)
    for key in ("mIoU", "aAcc", "mAcc"):
        assert result[key] == pytest.approx(expected[key], abs=1e-9)
    np.testing.assert_allclose(result["per_class_iou"], expected["per_class_iou"])
    np.testing.assert_allclose(result["per_class_acc"], expected["per_class_acc"])
    assert math.isnan(result["per_class_iou"][3]) and math.isnan(result["per_class_acc"][3])  # absent: left out
    assert result["per_class_iou"][4] == 0 and math.isnan(result["per_class_acc"][4])  # predicted, never true
    assert result["mIoU"] == pytest.approx(np.mean([result["per_class_iou"][c] for c in (0, 1, 2, 4)]))


def test_batched_tensors_and_updates_accumulate_one_matrix():
    preds, targets = toy()
    whole = computed(preds, targets)
    metric = SegmentationMetrics(NUM_CLASSES)
    for pred, target in zip(preds, targets):
        metric.update(pred[None], target[None])  # (1, H, W) batches, one image at a time
    assert metric.compute()["mIoU"] == pytest.approx(whole["mIoU"])
    batch = SegmentationMetrics(NUM_CLASSES)
    batch.update(torch.stack([preds[0], preds[0]]), torch.stack([targets[0], targets[0]]))
    assert_same(batch.compute(), computed([preds[0]], [targets[0]]))
    metric.reset()
    assert int(metric.confusion.sum()) == 0


def test_ignored_pixels_do_not_count_whatever_is_predicted_there():
    preds, targets = toy()
    changed = [torch.where(target == 255, (pred + 1) % 3, pred) for pred, target in zip(preds, targets)]
    assert_same(computed(changed, targets), computed(preds, targets))


def test_multiclass_jaccard_macro_agrees_on_miou_but_not_on_absent_classes():
    preds, targets = toy()
    ours = computed(preds, targets)
    jaccard = MulticlassJaccardIndex(NUM_CLASSES, average="macro", ignore_index=255)
    per_class = MulticlassJaccardIndex(NUM_CLASSES, average="none", ignore_index=255)
    for pred, target in zip(preds, targets):
        jaccard.update(pred, target)
        per_class.update(pred, target)
    assert float(jaccard.compute()) * 100 == pytest.approx(ours["mIoU"], abs=1e-4)
    assert float(per_class.compute()[3]) == 0.0 and math.isnan(ours["per_class_iou"][3])


def test_multiclass_accuracy_macro_is_not_macc():
    preds, targets = toy()
    ours = computed(preds, targets)
    accuracy = MulticlassAccuracy(NUM_CLASSES, average="macro", ignore_index=255)
    for pred, target in zip(preds, targets):
        accuracy.update(pred.reshape(-1), target.reshape(-1))
    present = [ours["per_class_acc"][c] for c in (0, 1, 2)]
    assert float(accuracy.compute()) * 100 == pytest.approx(sum(present) / 4, abs=1e-4)  # class 4 counted as 0
    assert ours["mAcc"] == pytest.approx(sum(present) / 3)


def test_torchmetrics_mean_iou_averages_per_image_and_differs():
    preds, targets = toy()
    targets = [torch.where(target == 255, pred, target) for pred, target in zip(preds, targets)]  # it can't ignore
    ours = computed(preds, targets)
    per_image = MeanIoU(num_classes=NUM_CLASSES, input_format="index")
    for pred, target in zip(preds, targets):
        per_image.update(pred[None], target[None])
    assert abs(float(per_image.compute()) * 100 - ours["mIoU"]) > 1.0


def test_distributed_state_is_summed():
    first, second = SegmentationMetrics(3), SegmentationMetrics(3)
    first.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    second.update(torch.tensor([[2, 2]]), torch.tensor([[2, 255]]))
    first.merge_state(second)  # merges with the states' dist_reduce_fx, the reduction a process-group sync uses
    assert first.confusion.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]


def test_bad_input():
    metric = SegmentationMetrics(3)
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="outside 0..2"):  # torchmetrics alone would count it in another cell
        metric.update(torch.full((1, 2, 2), 3), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside 0..2"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="class indices"):
        metric.update(torch.rand(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    assert int(metric.confusion.sum()) == 0  # nothing counted by the refused updates
    metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 255))  # all ignored: fine
    with pytest.raises(ValueError):
        SegmentationMetrics(0)


def test_per_class_table():
    result = metrics_from_confusion(torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))
    table = per_class_table(result, ["sky", "tree", "road"])
    assert table.splitlines()[2] == "| sky | 75.00 | 75.00 |"
    assert "| tree | 66.67 | 100.00 |" in table and "| road | - | - |" in table
    assert "| **mean** | **70.83** | **87.50** |" in table and "| aAcc | 83.33 | |" in table
    with pytest.raises(ValueError, match="2 class names for 3"):
        per_class_table(result, ["sky", "tree"])


def test_processes_sum_their_confusion_matrices_through_torchmetrics_sync():
    """Two processes, each with its own images: torchmetrics' sync gathers the states of every process and reduces
    them with the metric's ``dist_reduce_fx`` (sum). The gather is simulated (a real process group forked from a
    busy test process can hang); what is checked is that the metric's state reduces to the whole dataset's."""
    preds, targets = toy()
    shards = [SegmentationMetrics(NUM_CLASSES) for _ in range(2)]
    for rank, shard in enumerate(shards):
        shard.update(preds[rank::2], targets[rank::2])
    states = [shard.confusion.clone() for shard in shards]

    def gather(tensor, group=None):  # every process's state, as torchmetrics' gather_all_tensors returns them
        return [state.clone() for state in states]

    gathered = SegmentationMetrics(NUM_CLASSES, distributed_available_fn=lambda: True, dist_sync_fn=gather)
    gathered.update(preds[0::2], targets[0::2])  # what process 0 saw; the sync brings process 1's counts in
    assert_same(gathered.compute(), computed(preds, targets))  # images 0, 2 on one process, 1 on the other
    assert_same(shards[1].compute(), computed(preds[1::2], targets[1::2]))  # unsynced: its own images only
