"""The embedded tiny CLIP: its data and held-out classes, the pretraining loss, the exported open_clip folder (loaded
by open_clip alone and by visionpeft as ``model.name=FOLDER``), and zero-shot above chance on held-out classes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from visionpeft.backbones.factory import create_open_clip
from visionpeft.config.classification import ModelConfig
from visionpeft.demo.clip_mix import CIRCLE_COLOURS, HELD_OUT_PAIRS, PAIRS, TEMPLATES, circle_images, class_names
from visionpeft.demo.pretrain_clip import ClassContrastiveCLIP, soft_cross_entropy
from visionpeft.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "tiny_clip"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def open_clip_folder(folder: Path) -> Path:
    """A tiny open_clip folder as the pretraining writes one (config + safetensors weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    state = open_clip.CLIP(**TINY_CFG).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "open_clip_model.safetensors")
    return folder


def model_cfg(name: str, **extra):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {"library": "open_clip", "name": name, **extra})


def test_held_out_pairs_use_every_colour_twice_as_fill_and_as_background():
    fills, backs = Counter(f for f, _ in HELD_OUT_PAIRS), Counter(b for _, b in HELD_OUT_PAIRS)
    assert set(fills.values()) == {2} and set(backs.values()) == {2} and len(fills) == len(CIRCLE_COLOURS)
    assert len(set(HELD_OUT_PAIRS)) == 16 and set(HELD_OUT_PAIRS) <= set(PAIRS)
    assert len(class_names("subjects")) == 23 and len(class_names("circles")) == 56


def test_circle_splits_differ_and_repeat():
    train, test = circle_images("train"), circle_images("test")
    assert len(train) == 56 * 24 and len(test) == 56 * 8
    assert (circle_images("test").images == test.images).all()  # seeded
    assert not any((test.images[0] == image).all() for image in train.images[train.targets.index(0) :][:24])


def test_soft_cross_entropy_with_one_positive_is_cross_entropy():
    logits = torch.randn(5, 7)
    target = torch.tensor([0, 3, 6, 2, 2])
    assert torch.allclose(soft_cross_entropy(logits, F.one_hot(target, 7).float()), F.cross_entropy(logits, target))


def test_class_contrastive_loss_equals_a_reference():
    """Reference: for each image, cross-entropy against the uniform distribution over the batch's distinct captions of
    its class, and the same from each distinct caption to the images of its class (UniCL's targets)."""
    torch.manual_seed(0)
    clip = open_clip.CLIP(**TINY_CFG).eval()
    classes = ["cat", "dog", "red circle on a blue background"]
    model = ClassContrastiveCLIP(clip, classes)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 1, 2, 0, 0])
    torch.manual_seed(1)
    loss = model((images, labels))
    torch.manual_seed(1)
    drawn = torch.randint(len(TEMPLATES), labels.shape)
    captions = sorted({(int(y), int(t)) for y, t in zip(labels, drawn)})
    texts = [TEMPLATES[t].format(classes[y]) for y, t in captions]
    image_features = F.normalize(clip.encode_image(images), dim=-1)
    text_features = F.normalize(clip.encode_text(open_clip.tokenize(texts, context_length=16)), dim=-1)
    logits = clip.logit_scale.exp() * image_features @ text_features.T
    terms = []
    for i, y in enumerate(labels.tolist()):
        positives = [j for j, (c, _) in enumerate(captions) if c == y]
        terms.append(-logits[i].log_softmax(0)[positives].mean())
    image_side = torch.stack(terms).mean()
    terms = []
    for j, (c, _) in enumerate(captions):
        positives = [i for i, y in enumerate(labels.tolist()) if y == c]
        terms.append(-logits[:, j].log_softmax(0)[positives].mean())
    assert torch.allclose(loss, (image_side + torch.stack(terms).mean()) / 2, atol=1e-5)


def test_an_open_clip_folder_is_a_model_name(tmp_path):
    folder = open_clip_folder(tmp_path / "clip")
    model = create_open_clip(model_cfg(str(folder)))
    reference = open_clip.create_model(f"local-dir:{folder}")
    tokens = model._visionpeft_tokenizer(["a photo of a cat."])
    assert tokens.shape == (1, 16)
    assert torch.equal(model.encode_text(tokens), reference.encode_text(tokens))
    random = create_open_clip(model_cfg(str(folder), pretrained=False))  # the architecture, not the folder's weights
    assert not torch.equal(random.encode_text(tokens), reference.encode_text(tokens))


def test_a_folder_without_open_clip_config_is_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="is a folder without open_clip_config.json") as err:
        create_open_clip(model_cfg(str(tmp_path)))
    assert "\n" not in str(err.value)


# -- the shipped checkpoint ----------------------------------------------------------------------------------------
shipped = pytest.mark.skipif(not (SHIPPED / "open_clip_model.safetensors").is_file(), reason="no checkpoints/tiny_clip")


@shipped
def test_the_shipped_tiny_clip_is_small_and_recorded():
    assert (SHIPPED / "open_clip_model.safetensors").stat().st_size < 10 * 2**20
    record = json.loads((SHIPPED / "training.json").read_text())
    assert record["held_out_subjects"] == ["digit 7", "texture brick"] and len(record["held_out_pairs"]) == 16
    assert record["losses"][-1][1] < record["losses"][0][1] / 2
    card = (SHIPPED / "README.md").read_text()
    assert 'open_clip.create_model("local-dir:checkpoints/tiny_clip")' in card


@shipped
def test_the_shipped_tiny_clip_is_zero_shot_above_chance_on_held_out_colour_pairs():
    from visionpeft.demo.pretrain_clip import eval_transform, load_folder
    from visionpeft.tasks.clip_classifier import CLIPClassifier

    clip = load_folder(SHIPPED).eval()
    test = circle_images("test")
    held_out = [i for i, y in enumerate(test.targets) if PAIRS[y] in HELD_OUT_PAIRS]
    images = torch.stack([eval_transform(clip)(test[i][0]) for i in held_out])
    with torch.no_grad():
        predicted = CLIPClassifier(clip, test.classes).eval()(images).argmax(-1)
    accuracy = (predicted == torch.tensor([test.targets[i] for i in held_out])).float().mean().item()
    assert accuracy > 10 / 56  # ten times chance among all 56 pairs


@pytest.mark.slow
@shipped
def test_the_card_snippet_loads_the_shipped_folder_with_open_clip_alone():
    """The card's code, run in a new process that imports no visionpeft, gives the features visionpeft computes."""
    card = (SHIPPED / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    probe = (
        snippet
        + "\nimport sys, torch\nassert 'visionpeft' not in sys.modules\n"
        + "tokens = tokenizer(['a photo of a cat.'])\nwith torch.no_grad():\n"
        + "    print(model.encode_text(tokens)[0, :4].tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    model = create_open_clip(model_cfg("checkpoints/tiny_clip"))
    with torch.no_grad():
        expected = model.encode_text(model._visionpeft_tokenizer(["a photo of a cat."]))[0, :4]
    assert torch.allclose(torch.tensor(json.loads(out.strip().splitlines()[-1])), expected, atol=1e-6)


@pytest.mark.slow
def test_a_short_pretraining_lowers_the_loss_and_exports_an_open_clip_folder(tmp_path):
    """tools/pretrain.py on tiny widths: the loss falls, the exported folder (fp16) is what open_clip loads, with its
    card and training record."""
    sys.path.insert(0, str(ROOT / "tools"))
    import pretrain

    overrides = [
        "model.vision_width=32",
        "model.vision_layers=1",
        "model.vision_head_width=16",
        "model.text_width=16",
        "model.text_layers=1",
        "model.text_heads=2",
        "model.embed_dim=16",
        "data.batch_size=64",
        "optim.steps=8",
        "optim.warmup_steps=2",
        "optim.lr=0.003",
        "train.log_every=1",
        "train.eval_every=8",
        "train.report_to=none",
        f"train.output_dir={tmp_path / 'runs'}",
    ]
    config = str(ROOT / "configs" / "pretrain" / "tiny_clip.yaml")
    assert pretrain.main([config, *overrides, "--out", str(tmp_path / "out")]) == 0
    folder = tmp_path / "out" / "tiny_clip"
    record = json.loads((folder / "training.json").read_text())
    losses = [loss for _, loss in record["losses"]]
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3])
    assert record["steps"] == 8 and set(record["zero_shot_test"]) == {"single template", "8 templates"}
    loaded = open_clip.create_model(f"local-dir:{folder}")
    # the run's fp32 weights, rounded to fp16 as the export stores them
    fp32 = load_file(tmp_path / "runs" / "tiny_clip" / "model" / "open_clip_model.safetensors")
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, fp32[name].half().float()), name
    assert "# tiny_clip" in (folder / "README.md").read_text()


@pytest.mark.slow
def test_eval_zeroshot_takes_a_folder_and_adds_training_free_tip_adapter(tmp_path, capsys):
    """--model FOLDER needs no --pretrained; --base-to-new gives base, new and their harmonic mean; --tip-adapter
    adds Tip-Adapter fitted on the base classes' few shots (base column only)."""
    import eval_zeroshot

    from visionpeft.cli.common import run

    folder = open_clip_folder(tmp_path / "clip")
    args = ["--model", str(folder), "--dataset", "digits", "--limit", "32", "--batch-size", "16", "--base-to-new"]
    assert run(eval_zeroshot.main, [*args, "--tip-adapter", "--shots", "2"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert (
        rows[0]
        == f"| prompts ({folder} (its own weights), digits test: 32 base, 32 new images) | base | new | HM | images/s |"
    )
    cells = rows[2].split("|")
    base, new, hm = (float(cells[i]) for i in (2, 3, 4))
    assert hm == pytest.approx(2 * base * new / (base + new) if base + new else 0.0, abs=0.01)
    assert rows[-1].startswith("| Tip-Adapter (training-free, 2 shots) | ") and rows[-1].split("|")[3:5] == [
        " - ",
        " - ",
    ]
