"""Helpers for the classification tests: a local "pretrained" tiny ViT and tiny CIFAR-format data."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from safetensors.torch import save_file
from tiny_models import tiny_vit

ROOT = Path(__file__).resolve().parents[1]


def write_tiny_cifar10(root: Path, train_per_class: int = 8, test_per_class: int = 4, seed: int = 0) -> Path:
    """Writes ``root/cifar-10-batches-py`` in torchvision's pickle layout: class-coloured noisy 32x32 images."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.integers(0, 256, (10, 3))

    def batch(per_class: int) -> dict:
        labels = np.repeat(np.arange(10), per_class)
        rng.shuffle(labels)
        images = np.clip(colours[labels][:, :, None, None] + rng.normal(0, 40, (len(labels), 3, 32, 32)), 0, 255)
        return {"data": images.astype(np.uint8).reshape(len(labels), -1), "labels": labels.tolist()}

    for i in range(1, 6):  # torchvision reads all five training batches
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(max(1, train_per_class // 5)), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(test_per_class), f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return root


def write_pretrained_vit(path: Path) -> Path:
    """The tiny ViT saved as a local "pretrained" checkpoint (safetensors)."""
    save_file({k: v.contiguous() for k, v in tiny_vit(seed=123).state_dict().items()}, path)
    return path


def tiny_config(tmp: Path, checkpoint: Path, data_root: Path) -> Path:
    """A complete experiment YAML for the tiny ViT and tiny CIFAR-10."""
    config = tmp / "tiny.yaml"
    config.write_text(
        f"""
model:
  library: timm
  name: vit_tiny_patch16_224
  checkpoint: {checkpoint}
  img_size: 32
  kwargs: {{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}}
method: {{name: vpt, num_tokens: 2}}
data: {{name: cifar10, root: {data_root}, batch_size: 8, eval_batch_size: 20, num_workers: 0, img_size: 32}}
optim: {{name: adamw, lr: 0.01, epochs: 3, warmup_epochs: 1, weight_decay: 0.0}}
train: {{seed: 0, output_dir: {tmp / "runs"}, log_every: 1}}
"""
    )
    return config


def write_tiny_cifar100(root: Path, per_class: int = 1, seed: int = 0) -> Path:
    """Writes ``root/cifar-100-python`` (train, test, meta) in torchvision's layout, ``per_class`` images each."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "test"):
        labels = np.repeat(np.arange(100), per_class)
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{i}" for i in range(100)]}, f)
    return root


def write_tiny_vtab(root: Path, task: str, num_classes: int, train_per_class: int = 4, test_per_class: int = 2) -> Path:
    """Writes ``root/<task>/`` in the VPT / NOAH VTAB-1k layout: PNG images and the four list files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = root / task
    (folder / "images").mkdir(parents=True, exist_ok=True)
    colours = rng.integers(0, 256, (num_classes, 3))
    lists: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
    counts = {"train800": train_per_class, "val200": max(1, train_per_class // 2), "test": test_per_class}
    for split, per_class in counts.items():
        for label in range(num_classes):
            for i in range(per_class):
                pixels = np.clip(colours[label] + rng.normal(0, 30, (24, 40, 3)), 0, 255).astype(np.uint8)
                name = f"images/{split}_{label}_{i}.png"
                Image.fromarray(pixels).save(folder / name)  # not square: the protocol's resize must handle it
                lists[split].append(f"{name} {label}")
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root
