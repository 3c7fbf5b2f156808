"""tools/eval.py, tools/eval_zeroshot.py and load_adapter: bad arguments and malformed checkpoints are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _classify_utils import ROOT, tiny_config, write_pretrained_vit, write_tiny_cifar10
from PIL import Image

import visionpeft as vp
from visionpeft.cli.common import run
from visionpeft.cli.eval import main as eval_main
from visionpeft.cli.eval_zeroshot import main as zeroshot_main
from visionpeft.config import load_config, save_config
from visionpeft.errors import CheckpointError
from visionpeft.trainers.classification import build_experiment


def _tool(name, *args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *map(str, args)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("tool", ["eval.py", "eval_zeroshot.py"])
def test_batch_size_zero_is_an_argument_error(tool, tmp_path):
    args = [tmp_path] if tool == "eval.py" else ["--model", "ViT-B-32", "--dataset", "cifar10"]
    result = _tool(tool, *args, "--batch-size", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("argument --batch-size: must be a positive integer, got 0")


def test_base_to_new_on_one_class_is_one_line(tmp_path, capsys):
    (tmp_path / "test" / "only").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "only" / "0.png")
    args = ["--model", "ViT-B-32", "--random-weights", "--dataset", "imagefolder", "--data-root", str(tmp_path)]
    args.append("--base-to-new")
    assert run(zeroshot_main, args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: the base-to-new class split needs at least 2 classes; the dataset has 1"
    ]


@pytest.fixture(scope="module")
def vpt_run(tmp_path_factory):
    """A run folder whose config is VPT; its `lora` folder holds a LoRA adapter of the same model."""
    tmp = tmp_path_factory.mktemp("evalrun")
    config = load_config(tiny_config(tmp, write_pretrained_vit(tmp / "vit.safetensors"), write_tiny_cifar10(tmp / "d")))
    run_dir = tmp / "run"
    run_dir.mkdir()
    save_config(config, run_dir / "config.yaml")
    exp = build_experiment(config)
    vp.save_adapter(exp.model, run_dir / "last")
    vp.detach(exp.model)
    vp.save_adapter(vp.attach(exp.model, "lora", r=2), run_dir / "lora")
    return run_dir


def test_evaluating_an_adapter_of_another_method_says_so(vpt_run, capsys):
    assert run(eval_main, [str(vpt_run), "--checkpoint", "lora"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"warning: {vpt_run / 'lora'} holds lora, not the run config's vpt; evaluating what was loaded"
    ]
    assert "top1" in captured.out
    assert run(eval_main, [str(vpt_run), "--checkpoint", "last"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"format": "visionpeft"}, "has no 'methods' list"),
        ({"format": "visionpeft", "methods": {"name": "lora"}}, "has no 'methods' list"),
        ({"format": "visionpeft", "methods": [{"config": {}}]}, 'methods[0] is not {"name": ..., "config": {...}}'),
        ({"format": "visionpeft", "methods": ["lora"]}, 'methods[0] is not {"name": ..., "config": {...}}'),
        ({"format": "visionpeft", "methods": [{"name": "lora", "config": 3}]}, "methods[0] is not"),
        ({"format": "visionpeft", "methods": [], "backbone": "vit"}, "'backbone' is not an object"),
        ([1, 2], "is not a visionpeft adapter config (not a JSON object)"),
    ],
)
def test_malformed_adapter_config_is_a_checkpoint_error(vit, tmp_path, config, message):
    (tmp_path / "visionpeft_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        vp.load_adapter(vit, tmp_path)
    assert message in str(info.value) and "visionpeft_config.json" in str(info.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "lora", "config": {"r": 0}}, "method 'lora' option 'r' must be at least 1, got 0"),
        ({"name": "lorra", "config": {}}, "unknown method 'lorra'"),
        ({"name": "lora", "config": {"rank": 2}}, "unknown option 'rank' for method 'lora'"),
    ],
)
def test_adapter_config_with_bad_method_entries_is_a_checkpoint_error(vit, tmp_path, entry, message):
    saved = json.loads((vp.save_adapter(vp.attach(vit, "lora", r=2), tmp_path) / "visionpeft_config.json").read_text())
    vp.detach(vit)
    saved["methods"] = [entry]
    (tmp_path / "visionpeft_config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="visionpeft_config.json: ") as info:
        vp.load_adapter(vit, tmp_path)
    assert message in str(info.value)


def test_an_adapter_with_nan_or_integer_weights_or_a_damaged_base_record_is_refused(vit, tmp_path):
    """`vp.load_adapter` on an adapter whose weights are NaN (a diverged run), integers where the model's parameters
    are floating point, or whose `base_model.sha256` is not a hash (the base check was skipped): one line each, and
    the model is left as it was given."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = vp.save_adapter(vp.attach(vit, "lora", r=2), tmp_path / "a")
    vp.detach(vit)
    weights, config_file = folder / "visionpeft_adapter.safetensors", folder / "visionpeft_config.json"
    tensors, config = load_file(weights), json.loads(config_file.read_text())
    first = sorted(tensors)[0]
    cases = [
        ({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, config, "holds NaN or infinite values in"),
        ({**tensors, first: tensors[first].long()}, config, f"does not fit this model (dtype mismatch: {first} int64"),
        (tensors, {**config, "base_model": {**config["base_model"], "sha256": 12345}}, "records base_model.sha256 = "),
        (tensors, {**config, "base_model": {"sha256": None}}, "records base_model.sha256 = null, not a sha256 of 64"),
        (tensors, {**config, "base_model": "vit"}, 'records base_model = "vit", not a sha256 of 64 hex digits'),
    ]
    for state, record, message in cases:
        save_file(state, weights)
        config_file.write_text(json.dumps(record))
        with pytest.raises(CheckpointError) as info:
            vp.load_adapter(vit, folder)
        assert str(info.value).startswith(f"{folder} ") and message in str(info.value), str(info.value)
        assert vp.attached_methods(vit) == []
    vp.load_adapter(vit, folder, check_base=False)  # the damaged record is skipped when asked
    assert [name for name, _ in vp.attached_methods(vit)] == ["lora"]
    vp.detach(vit)


@pytest.mark.slow
def test_zero_shot_needs_weights_asked_for_and_its_table_says_which_ran_and_how_many_images(monkeypatch, capsys):
    """`tools/eval_zeroshot.py` without `--pretrained` evaluated a randomly initialised CLIP under a normal-looking
    table: now one line asks for `--pretrained` (or `--random-weights`), and the header names the weights and the
    number of images evaluated (`--limit 8`: 8, not the split's 360)."""
    from tiny_models import tiny_clip_bpe

    base = ["--model", "ViT-B-32", "--dataset", "digits", "--limit", "8", "--batch-size", "8"]
    assert run(zeroshot_main, base) == 2
    assert capsys.readouterr().err.strip() == (
        "error: give --pretrained TAG_OR_FILE (e.g. openai, or a local weights file) for a pretrained CLIP, or "
        "--random-weights to evaluate a randomly initialised one"
    )
    monkeypatch.setattr("visionpeft.backbones.factory.create_open_clip", lambda cfg: tiny_clip_bpe())
    assert run(zeroshot_main, [*base, "--random-weights"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| prompts (ViT-B-32 (random weights, not pretrained), digits test, 8 images) | top-1 | images/s |"
    assert len(out) == 4 and all(line.startswith("| zero-shot") for line in out[2:])


@pytest.mark.slow
def test_zero_shot_offline_errors_name_its_own_flags_and_print_once(tmp_path):
    """`tools/eval_zeroshot.py` offline: the weights and data errors advise this command's `--pretrained FILE`,
    `--data-root` and `--download` (not the run-config keys `model.checkpoint=` / `data.download=true`), and
    open_clip's own `ERROR:root:` line no longer repeats ours: stderr is the one line."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"), "OMP_NUM_THREADS": "1"}
    common = [sys.executable, str(ROOT / "tools" / "eval_zeroshot.py"), "--model", "ViT-B-32", "--pretrained", "openai"]
    cases = {
        ("--dataset", "digits"): "error: could not load open_clip 'ViT-B-32' with pretrained='openai' (no network, "
        "not in the cache); pass --pretrained /path/to/open_clip_weights.bin",
        ("--dataset", "cifar10", "--data-root", str(tmp_path)): f"error: cifar10 not found under {tmp_path} (expected "
        "cifar-10-batches-py/); point --data-root at a folder holding it, or pass --download",
    }
    for args, message in cases.items():
        result = subprocess.run([*common, *args], capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 2 and result.stderr.strip() == message, result.stderr
