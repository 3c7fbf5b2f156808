"""CLIP through the trainer (CoOp few-shot, base-to-new) and tools/eval_zeroshot.py's comparison table."""

from __future__ import annotations

import json

import eval_zeroshot  # noqa: E402
import open_clip
import pytest
import torch

from visionpeft.cli.common import run  # noqa: E402
from visionpeft.config import load_config  # noqa: E402
from visionpeft.trainers.classification import run as train  # noqa: E402

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip")
    (tmp / "tiny-clip-test.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp / "tiny-clip-test.json")
    torch.manual_seed(0)
    weights = tmp / "tiny_clip.pt"
    torch.save(open_clip.create_model("tiny-clip-test").state_dict(), weights)
    return weights


def _config(tmp_path, weights, *overrides):
    path = tmp_path / "coop.yaml"
    path.write_text(f"""
model: {{library: open_clip, name: tiny-clip-test, checkpoint: {weights}, clip_head: prompts}}
method: {{name: coop, n_ctx: 4}}
data: {{name: digits, img_size: 32, batch_size: 16, num_workers: 0, shots: 4, val_split: null}}
optim: {{name: sgd, lr: 0.05, epochs: 3, warmup_epochs: 1}}
train: {{output_dir: {tmp_path / "runs"}}}
""")
    return load_config(path, list(overrides))


@pytest.mark.slow
def test_coop_trains_few_shot_and_the_tool_compares_it_with_zero_shot(tmp_path, tiny_clip_file, capsys):
    config = _config(tmp_path, tiny_clip_file, "train.run_name=coop")
    results = train(config, tmp_path / "runs" / "coop", cpu=True)
    assert results["parameters"]["by_group"] == {"coop": 4 * 32}
    records = (tmp_path / "runs" / "coop" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(x)["train/epoch_loss"] for x in records if "train/epoch_loss" in x]
    assert losses[-1] < losses[0]
    capsys.readouterr()
    args = [
        "--model",
        "tiny-clip-test",
        "--pretrained",
        str(tiny_clip_file),
        "--dataset",
        "digits",
        "--limit",
        "64",
        "--prompts",
        str(tmp_path / "runs" / "coop"),
    ]
    assert run(eval_zeroshot.main, args) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == f"| prompts (tiny-clip-test ({tiny_clip_file}), digits test, 64 images) | top-1 | images/s |"
    assert len(table) == 5
    assert 'zero-shot "a photo of a {}."' in table[2] and "80-template ensemble" in table[3]
    assert table[4].startswith("| learned: ") and 0 <= float(table[4].split("|")[2]) <= 100
    assert run(eval_zeroshot.main, [*args, "--base-to-new"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].endswith(", digits test: 64 base, 64 new images) | base | new | HM | images/s |") and len(rows) == 5


def test_vision_lora_with_a_text_initialised_head(tmp_path, tiny_clip_file):
    config = _config(
        tmp_path,
        tiny_clip_file,
        "train.run_name=lora",
        "model.clip_head=linear",
        "method={name: lora, r: 2}",
        "data.class_split=base",
    )
    results = train(config, tmp_path / "runs" / "lora", cpu=True)
    assert set(results["parameters"]["by_group"]) == {"lora", "head"}
    assert results["parameters"]["by_group"]["head"] == 5 * 16 + 5  # the 5 base classes of digits


def test_wrong_prompt_folder_is_one_line(tmp_path, tiny_clip_file, capsys):
    from tiny_models import tiny_vit

    import visionpeft as vp

    vp.save_adapter(vp.attach(tiny_vit(), "lora"), tmp_path / "lora")
    args = [
        "--model",
        "tiny-clip-test",
        "--pretrained",
        str(tiny_clip_file),
        "--dataset",
        "digits",
        "--limit",
        "8",
        "--prompts",
        str(tmp_path / "lora"),
    ]
    assert run(eval_zeroshot.main, args) == 2
    assert "holds ['lora'], not learned prompts" in capsys.readouterr().err
