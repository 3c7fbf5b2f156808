"""``visionpeft adapters combine|resize|extract|inspect`` (tools/adapters.py): each subcommand writes what the API
writes and prints its table; bad input is one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from _arithmetic_utils import WHOLE_LAYERS, lora_folder
from safetensors.torch import save_file
from tiny_models import tiny_unet, tiny_vit

import visionpeft as vp
from visionpeft.arithmetic.combine import COMBINATIONS
from visionpeft.arithmetic.records import read_adapter
from visionpeft.cli import COMMANDS
from visionpeft.cli.adapters import COMBINATION_TYPES, main
from visionpeft.cli.common import run


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    lora_folder(root / "a", seed=1, r=4, **WHOLE_LAYERS)
    lora_folder(root / "b", seed=2, r=4, alpha=2.0, **WHOLE_LAYERS)
    return root


def _run(argv, capsys):
    code = run(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_is_listed_and_its_choices_are_the_api_s():
    assert COMMANDS["adapters"][0] == "adapters"
    assert set(COMBINATION_TYPES) == set(COMBINATIONS)
    probe = "import sys, visionpeft.cli.adapters; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


def test_combine_writes_what_the_api_writes(folders, tmp_path, capsys):
    argv = ["combine", folders / "a", folders / "b", "--weights", "0.5", "1", "--type", "dare_ties_svd"]
    argv += ["--density", "0.5", "--svd-rank", "2", "--seed", "3", "--out", tmp_path / "ab"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "relative error" in out and f"wrote {tmp_path / 'ab'}" in out
    expected = vp.combine_adapters(
        [folders / "a", folders / "b"], [0.5, 1.0], "dare_ties_svd", density=0.5, svd_rank=2, seed=3
    )
    written = read_adapter(tmp_path / "ab")
    assert written.config["methods"] == expected.config["methods"]
    for name, tensor in expected.tensors.items():
        torch.testing.assert_close(written.tensors[name], tensor, rtol=0, atol=0)


def test_resize_prints_each_layer_and_inspect_describes_the_folder(folders, tmp_path, capsys):
    code, out, err = _run(["resize", folders / "a", "--rank", "2", "--out", tmp_path / "a2"], capsys)
    assert code == 0, err
    assert "blocks.1.mlp.fc2" in out and "6 layers; relative error mean" in out
    code, out, err = _run(["inspect", tmp_path / "a2"], capsys)
    assert code == 0, err
    assert "lora: r=2, alpha=4.0" in out and "6 LoRA layers, stored rank 2" in out
    assert "base weights: unnamed; frozen-weights sha256" in out and "backbone: timm_vit VisionTransformer" in out


def test_extract_from_diffusers_folders_and_a_state_dict(tmp_path, capsys):
    base = tiny_unet()
    base.save_pretrained(tmp_path / "base")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.down_blocks[0].resnets[0].conv1.weight.add_(0.05)
    tuned.save_pretrained(tmp_path / "tuned")
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, tmp_path / "tuned.safetensors")
    for tuned_source, out in ((tmp_path / "tuned", "folder"), (tmp_path / "tuned.safetensors", "file")):
        argv = ["extract", "--base", tmp_path / "base", "--tuned", tuned_source, "--rank", "2"]
        code, text, err = _run([*argv, "--format", "kohya", "--out", tmp_path / out], capsys)
        assert code == 0, err
        assert "down_blocks.0.resnets.0.conv1" in text and (tmp_path / out / "lora_kohya.safetensors").is_file()


def test_bad_input_is_one_line_and_writes_nothing(folders, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    lora_folder(tmp_path / "other", seed=1, factory=lambda: tiny_vit(depth=3), **WHOLE_LAYERS)
    a, b, out = folders / "a", folders / "b", tmp_path / "out"
    cases = [
        (["combine", a, b, "--weights", "1", "1", "--type", "svd", "--out", out], "needs svd_rank"),
        (["combine", a, b, "--weights", "1", "--type", "cat", "--out", out], "one weight per adapter"),
        (["combine", a, tmp_path / "other", "--weights", "1", "1", "--type", "cat", "--out", out], "different bases"),
        (["combine", a, tmp_path / "none", "--weights", "1", "1", "--type", "cat", "--out", out], "does not exist"),
        (["combine", a, b, "--weights", "1", "1", "--type", "cat", "--out", tmp_path / "full"], "holds files"),
        (["resize", a, "--out", out], "needs rank"),
        (
            ["extract", "--base", a / "visionpeft_adapter.safetensors", "--tuned", a, "--rank", "2", "--out", out],
            "is a weights file",
        ),
        (["inspect", tmp_path / "full"], "visionpeft_config.json is missing"),
    ]
    for argv, message in cases:
        code, _, err = _run(argv, capsys)
        assert code == 2 and err.startswith("error: ") and message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert not out.exists()
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"]
