"""Bad input to the command-line tools: one clear line, a non-zero exit, no traceback, nothing lost."""

from __future__ import annotations

import subprocess
import sys

import pytest
import train as train_tool  # noqa: E402
from _classify_utils import ROOT, tiny_config, write_pretrained_vit, write_tiny_cifar10

from visionpeft.cli.common import run  # noqa: E402


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    return tiny_config(tmp, write_pretrained_vit(tmp / "vit.safetensors"), write_tiny_cifar10(tmp / "data"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=0.1"], "unknown config key 'optim.lrr' in override 'optim.lrr=0.1' (did you mean 'optim.lr'?)"),
        (
            ["data.batch_size=many"],
            "config key 'data.batch_size' in override 'data.batch_size=many' has the wrong type",
        ),
        (["method=vtp"], "unknown method 'vtp' (did you mean 'vpt'?)"),
        (["method.num_token=3"], "unknown option 'num_token' for method 'vpt' (did you mean 'num_tokens'?)"),
        (["data.root=/nowhere/cifar"], "cifar10 not found under /nowhere/cifar (expected cifar-10-batches-py/)"),
        (
            ["method=textual_inversion"],
            "method 'textual_inversion' needs token, which the classification task does not provide",
        ),
        (
            ["method={name: textual_inversion, token: x}"],
            "textual_inversion cannot attach to this model: timm_vit has no 'text_encoder' tower",
        ),
        (["model.checkpoint=/nowhere/vit.safetensors"], "checkpoint /nowhere/vit.safetensors does not exist"),
        (["model.name=vit_tiniest"], "unknown timm model 'vit_tiniest'"),
        (["optim.name=adam"], "config key 'optim.name' must be one of sgd, adamw, prodigy, adamw8bit, got 'adam'"),
        (["task=clasification"], "unknown task 'clasification' (did you mean 'classification'?)"),
        (
            ["optim.schedule=cosin"],
            "config key 'optim.schedule' must be one of constant, constant_with_warmup, cosine, linear, polynomial",
        ),
        (["optim.steps=50"], "optim.epochs (3) and optim.steps (50) are both set; set one of them to null"),
        (["optim.schedule=constant"], "optim.schedule=constant has no warmup; use optim.schedule=constant_with_warmup"),
        (
            ["optim.warmup_steps=5"],
            "optim.warmup_epochs (1) and optim.warmup_steps (5) are both set; set one of them to null",
        ),
        (["train.ema_decay=1.5"], "config key 'train.ema_decay' must be at most 1, got 1.5"),
        (["optim.lr=inf"], "config key 'optim.lr' must be a finite number, got inf"),
        (["model.checkpoint=/"], "config key 'model.checkpoint' names /, which is a folder, not a file"),
        (["data.root=/dev/null"], "config key 'data.root' names /dev/null, which is not a folder"),
    ],
)
def test_bad_config_is_one_line(config, overrides, message, capsys):
    assert run(train_tool.main, [str(config), *overrides, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_missing_config_file_exits_nonzero_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: config file {tmp_path / 'nope.yaml'} does not exist"


def test_rerunning_a_command_keeps_both_runs(config, capsys):
    args = [str(config), "optim.epochs=1", "train.run_name=keep"]
    assert run(train_tool.main, args) == 0
    run_dir = config.parent / "runs" / "keep"
    before = (run_dir / "metrics.jsonl").read_text()
    assert run(train_tool.main, args) == 0
    assert "holds an earlier run (kept" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text() == before
    second = config.parent / "runs" / "keep-2"
    assert (second / "metrics.jsonl").is_file()
    assert "run_name: keep-2" in (second / "config.yaml").read_text()
    (run_dir / "last" / "marker").write_text("from the earlier run")
    assert run(train_tool.main, [*args, "--overwrite"]) == 0  # the explicit word deletes the earlier run
    assert not (run_dir / "last" / "marker").exists() and (run_dir / "metrics.jsonl").is_file()
    assert not (config.parent / "runs" / "keep-3").exists()


def test_corrupt_image_in_an_image_folder_is_named(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = tmp_path / "imgs" / split / cls
            folder.mkdir(parents=True)
            Image.new("RGB", (32, 32), (200 if cls == "a" else 10, 0, 0)).save(folder / "0.png")
    (tmp_path / "imgs" / "train" / "a" / "1.png").write_bytes(b"not a png")
    cfg = tiny_config(tmp_path, write_pretrained_vit(tmp_path / "v.safetensors"), tmp_path / "imgs")
    args = [str(cfg), "data.name=imagefolder", "optim.epochs=1"]
    assert run(train_tool.main, args) == 2
    assert "1.png is not a readable image" in capsys.readouterr().err


def test_help_and_config_errors_answer_without_importing_torch(config):
    """The command parses and validates before anything heavy loads (the latency table is tools/benchmark.py cli)."""
    probe = (
        "import sys; from visionpeft.cli.common import run; from visionpeft.cli.train import main; "
        "code = run(main, sys.argv[1:]); print(code, 'torch' in sys.modules, 'timm' in sys.modules)"
    )
    for args in ([str(config), "optim.lrr=1"], [str(config), "optim.schedule=cosin"], ["/nowhere/x.yaml"]):
        result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
        assert result.stdout.split() == ["2", "False", "False"], (args, result.stdout, result.stderr)
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "task:" in result.stdout


def test_a_method_needing_an_input_the_task_does_not_give_is_refused_before_any_model(config, capsys, monkeypatch):
    """A control-style method (it reads a per-call condition image) in a classification run, and a method whose
    option the task cannot fill in: one line, exit 2, nothing built or written."""
    from dataclasses import dataclass

    from visionpeft.methods import METHODS, Method, MethodConfig

    @dataclass
    class NeedsConfig(MethodConfig):
        prompt: str = ""

    class NeedsControl(Method):
        name, config_class, call_inputs = "test_needs_control", NeedsConfig, ("control_image",)

    class NeedsPrompt(Method):
        name, config_class, task_inputs = "test_needs_prompt", NeedsConfig, ("prompt",)

    for cls in (NeedsControl, NeedsPrompt):
        monkeypatch.setitem(METHODS._items, cls.name, cls)
    built = []
    monkeypatch.setattr("visionpeft.trainers.classification.create_classifier", lambda *a: built.append(a))
    cases = {
        "test_needs_control": "method 'test_needs_control' needs a per-call control_image, which the classification "
        "task does not provide",
        "test_needs_prompt": "method 'test_needs_prompt' needs prompt, which the classification task does not provide",
    }
    for method, message in cases.items():
        assert run(train_tool.main, [str(config), f"method={method}", "train.run_name=refused"]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert built == [] and not (config.parent / "runs" / "refused").exists()


def test_the_visionpeft_command_lists_its_subcommands_and_names_a_typo():
    listing = subprocess.run([sys.executable, "-m", "visionpeft"], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and all(c in listing.stdout for c in ("train", "eval", "generate"))
    typo = subprocess.run([sys.executable, "-m", "visionpeft", "trian"], capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and typo.stderr.strip() == "error: unknown command 'trian' (did you mean 'train'?)"
    helped = subprocess.run(
        [sys.executable, "-m", "visionpeft", "train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0 and "--print-config" in helped.stdout
    from visionpeft.registry import TRAINERS

    listed = helped.stdout.rsplit("tasks (the config's task: key):", 1)[-1]
    assert all(task in listed for task in TRAINERS.names())  # every registered task, control included


def test_a_key_written_twice_in_a_config_or_grid_file_is_refused(config, tmp_path, capsys):
    """A config or grid YAML setting a key twice (`lr:` twice, or `optim.lr:` beside `optim: {lr: ...}`): one line
    naming the key and both lines, instead of YAML's silent "the last one wins"."""
    from visionpeft.errors import ConfigError
    from visionpeft.sweep.grid import read_grid

    twice = tmp_path / "twice.yaml"
    twice.write_text(f"_base_: {config}\noptim:\n  lr: 0.1\n  lr: 0.2\n")
    assert run(train_tool.main, [str(twice), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {twice} is not valid YAML: key 'optim.lr' is written twice (lines 3 and 4)"
    )
    grid = tmp_path / "grid.yaml"
    grid.write_text("optim.lr: [0.1, 0.01]\noptim:\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"key 'optim.lr' is written twice \(lines 1 and 3; a dotted key"):
        read_grid(grid)
    grid.write_text("method: {name: vpt, num_tokens: 5}\nmethod.num_tokens: [5, 10]\noptim.lr: 1e-3\n")
    assert read_grid(grid) == {
        "method": {"name": "vpt", "num_tokens": 5},
        "method.num_tokens": [5, 10],
        "optim.lr": 1e-3,
    }


def test_fill50k_generator_arguments_are_one_line_before_anything_is_written(tmp_path, capsys):
    """`tools/make_fill50k.py` with `--out` naming a file (or a path under one), `--size 60000` (a bare
    MemoryError before: the side is bounded at 4096 and the message says why) or `--seed -1` (the message named
    `--palette`): one line naming the argument; nothing is written."""
    import make_fill50k as fill_tool

    (tmp_path / "file").write_text("keep")
    cases = {
        ("--out", str(tmp_path / "file")): f"--out {tmp_path / 'file'} is a file, not a folder; give a new folder",
        ("--out", str(tmp_path / "file" / "sub")): f"cannot create the folder {tmp_path / 'file' / 'sub'}",
        ("--out", str(tmp_path / "big"), "--size", "60000"): "--size 60000 is outside 1 .. 4096: each pair is drawn",
        ("--out", str(tmp_path / "seed"), "--seed", "-1"): "--seed -1 is negative; a fill50k seed is 0 or more",
    }
    for args, message in cases.items():
        assert run(fill_tool.main, [*args, "--n", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "keep"


def _printed(probe: str) -> tuple[str, str]:
    """(stdout, stderr) of ``python -c probe``, which must exit 0."""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, result.stderr


def test_a_library_logging_on_the_root_logger_does_not_repeat_our_lines():
    """After a library's bare `logging.info(...)` (open_clip's, which runs `logging.basicConfig`), every line a
    command logs still prints once (a CLIP run printed each summary line twice, the second as `INFO:visionpeft...`);
    other libraries' warnings still reach stderr."""
    probe = (
        "import logging; from visionpeft.cli.common import configure_logging; configure_logging(); "
        "logging.info('open_clip parsing'); logging.getLogger('visionpeft.trainers.run').info('trainable: 5'); "
        "logging.getLogger('timm.models').warning('a library warning')"
    )
    assert _printed(probe) == ("trainable: 5\n", "a library warning\n")


def test_a_command_run_under_a_redirect_leaves_no_handler_on_a_closed_stream():
    """A command run in-process while stdout / stderr are redirected (a test's capture, a caller's redirect) leaves
    its log handlers on whatever the streams are later, not on the closed ones: a later record prints where the
    streams then point, with no `--- Logging error ---` traceback (a test of generate failed that way, its stderr
    holding diffusers' warning as a traceback)."""
    probe = (
        "import contextlib, io, logging, sys\n"
        "from visionpeft.cli.common import configure_logging\n"
        "gone, lost = io.StringIO(), io.StringIO()\n"
        "with contextlib.redirect_stdout(gone), contextlib.redirect_stderr(lost):\n"
        "    configure_logging()\n"
        "gone.close(); lost.close()\n"
        "logging.getLogger('visionpeft.trainers.run').info('trainable: 5')\n"
        "logging.getLogger('diffusers.loaders').warning('a library warning')\n"
    )
    assert _printed(probe) == ("trainable: 5\n", "a library warning\n")
