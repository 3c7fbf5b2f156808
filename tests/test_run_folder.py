"""A run folder is safe to resume and hard to lose: nothing in it runs code, a crash at any moment of a save leaves a
resumable state, a torn metrics line does not block resume, a failed save keeps the last state, and a new run never
writes into another run's folder or outside ``train.output_dir``."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import sys

import pytest
import train as train_tool  # noqa: E402
from _classify_utils import ROOT, tiny_config, write_pretrained_vit, write_tiny_cifar10
from safetensors.torch import load_file

from visionpeft.cli.common import run  # noqa: E402
from visionpeft.trainers import run_state  # noqa: E402


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folder")
    return tiny_config(tmp, write_pretrained_vit(tmp / "vit.safetensors"), write_tiny_cifar10(tmp / "data"))


class Hostile:
    """A pickle that creates ``marker`` when it is loaded."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _train(config, name, *args):
    return run(train_tool.main, [str(config), f"train.run_name={name}", "train.ema_decay=0.8", "--cpu", *args])


def _resume(config, name):
    return run(train_tool.main, ["--resume", str(config.parent / "runs" / name), "--cpu"])


def _losses(config, name):
    lines = (config.parent / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["train/loss"] for x in lines if "train/loss" in x]


@pytest.fixture(scope="module")
def straight(config):
    assert _train(config, "straight") == 0
    return config.parent / "runs" / "straight"


def test_resume_unpickles_nothing_that_can_run_code_and_keeps_the_ema(config, straight, tmp_path, capsys):
    """A pickle planted in a run's state (where accelerate would keep a registered EMA) is refused in one line and
    never loaded; a replaced random state is refused by the weights-only loader and the resume says it will not be
    exact; the EMA lives in safetensors."""
    assert _train(config, "hostile", "--stop-after", "1") == 0
    state = config.parent / "runs" / "hostile" / "state"
    assert (state / "ema.safetensors").is_file() and not list(state.glob("custom_checkpoint*"))
    marker = tmp_path / "ran"
    planted = state / "custom_checkpoint_0.pkl"  # where accelerate would keep (and unpickle) a registered EMA
    planted.write_bytes(pickle.dumps(Hostile(marker)))
    capsys.readouterr()
    assert _resume(config, "hostile") == 2
    assert "cannot be resumed: a file in it is damaged or was not written by visionpeft" in capsys.readouterr().err
    planted.unlink()
    (state / "random_states_0.pkl").write_bytes(pickle.dumps(Hostile(marker)))  # a replaced RNG state
    assert _resume(config, "hostile") == 0
    assert not marker.exists()
    assert "could not be restored" in capsys.readouterr().out  # the RNG state was refused: the run says so
    assert set(load_file(state / "ema.safetensors")) == {"shadow.0", "shadow.1", "shadow.2"}  # prompts, head W, b


def test_a_damaged_state_file_is_one_line_and_runs_nothing(config, tmp_path, capsys):
    """A hostile or damaged optimizer state: one line naming the state folder, nothing in it runs."""
    assert _train(config, "damaged", "--stop-after", "1") == 0
    marker = tmp_path / "ran"
    (config.parent / "runs" / "damaged" / "state" / "optimizer.bin").write_bytes(pickle.dumps(Hostile(marker)))
    capsys.readouterr()
    assert _resume(config, "damaged") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be resumed: a file in it is damaged or was not written by visionpeft" in err[0]
    assert not marker.exists()


@pytest.mark.parametrize("moment", ["tmp_written", "between_renames", "before_cleanup"])
def test_a_crash_at_any_moment_of_a_save_resumes_like_an_uninterrupted_run(config, straight, monkeypatch, moment):
    """Killed after the new state was written, between the two renames, or before the old state was deleted:
    `--resume` finds the newest complete state and repeats the uninterrupted run exactly; the same training command
    run again leaves the folder alone (its run goes to a numbered folder)."""
    name = f"crash_{moment}"
    assert _train(config, name, "--stop-after", "1") == 0
    commit = run_state.commit_state

    def crash(run_dir):
        final, tmp, old = run_dir / "state", run_dir / "state.tmp", run_dir / "state.old"
        if moment != "tmp_written":
            final.rename(old)
            if moment == "before_cleanup":
                tmp.rename(final)
        raise KeyboardInterrupt  # killed

    monkeypatch.setattr(run_state, "commit_state", crash)
    assert _resume(config, name) == 130
    monkeypatch.setattr(run_state, "commit_state", commit)
    run_dir = config.parent / "runs" / name
    assert run_state.newest_state(run_dir) is not None
    assert _train(config, name, "--stop-after", "1") == 0  # the same command again keeps this run, starts NAME-2
    assert run_state.newest_state(run_dir) is not None and (run_dir.parent / f"{name}-2" / "config.yaml").is_file()
    assert _resume(config, name) == 0
    assert _losses(config, name) == _losses(config, "straight")
    assert sorted(p.name for p in run_dir.glob("state*")) == ["state"]


def test_a_torn_last_metrics_line_is_dropped_and_a_damaged_one_is_named(config, straight, capsys):
    """Killed while appending to metrics.jsonl: the torn last line is dropped with a warning and the resume is
    exact; a damaged line elsewhere is one line naming the file and line number."""
    assert _train(config, "torn", "--stop-after", "1") == 0
    log = config.parent / "runs" / "torn" / "metrics.jsonl"
    with open(log, "a") as f:
        f.write('{"epoch": 2, "st')  # killed while appending
    capsys.readouterr()
    assert _resume(config, "torn") == 0
    assert "dropped a torn last line" in capsys.readouterr().out
    assert _losses(config, "torn") == _losses(config, "straight")
    assert _train(config, "bad_line", "--stop-after", "1") == 0
    log = config.parent / "runs" / "bad_line" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    capsys.readouterr()
    assert _resume(config, "bad_line") == 2
    assert capsys.readouterr().err.strip() == f"error: {log} line 2 is not a JSON record; fix or delete that line"


def test_a_failed_save_keeps_the_last_state_and_says_so(config, straight, monkeypatch, capsys):
    """A full disk while saving: one line saying which step's state is kept, no half-written state left; the run
    resumes from it exactly."""
    from accelerate import Accelerator

    save, calls = Accelerator.save_state, []

    def disk_full_on_the_second_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", disk_full_on_the_second_save)
    assert _train(config, "full_disk") == 2
    run_dir = config.parent / "runs" / "full_disk"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # after the progress bar
        f"error: could not save the run state at step 14 (No space left on device); the state of step 7 is kept in "
        f"{run_dir / 'state'}"
    )
    assert not (run_dir / "state.tmp").exists()
    monkeypatch.setattr(Accelerator, "save_state", save)
    assert _resume(config, "full_disk") == 0
    assert _losses(config, "full_disk") == _losses(config, "straight")


def test_an_unwritable_output_folder_is_one_line_before_any_model(config, capsys):
    """An output folder that cannot be created or written: one line before any model is built."""
    blocker = config.parent / "a_file"
    blocker.write_text("not a folder")
    assert _train(config, "nowhere", f"train.output_dir={blocker / 'runs'}") == 2
    assert capsys.readouterr().err.strip().startswith(f"error: cannot write the run folder {blocker / 'runs'}")


@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped", "a/b", ".."])
def test_run_name_cannot_leave_the_output_folder(config, name, capsys):
    """`train.run_name` with `/` or `..` (or absolute): one line; nothing is written outside `train.output_dir`."""
    assert run(train_tool.main, [str(config), f"train.run_name={name}", "--dry-run"]) == 2
    assert "must be a folder name inside train.output_dir" in capsys.readouterr().err
    assert not (config.parent / "escaped").exists()
    shutil.rmtree("/tmp/escaped", ignore_errors=True)


def test_a_batch_that_does_not_split_leaves_no_folder_behind(config, capsys):
    """`data.batch_size` not divisible by processes x `optim.grad_accum`: one line before the run folder exists."""
    assert _train(config, "indivisible", "optim.grad_accum=3") == 2
    assert capsys.readouterr().err.strip() == (
        "error: data.batch_size 8 is not divisible by 1 process(es) x optim.grad_accum 3"
    )
    assert not (config.parent / "runs" / "indivisible").exists()


def test_a_run_made_with_relative_paths_evaluates_from_another_directory(tmp_path, monkeypatch):
    import subprocess

    work = tmp_path / "work"
    work.mkdir()
    write_pretrained_vit(work / "vit.safetensors")
    write_tiny_cifar10(work / "data")
    text = tiny_config(work, work / "vit.safetensors", work / "data").read_text()
    text = text.replace(str(work / "vit.safetensors"), "vit.safetensors").replace(str(work / "data"), "data")
    text = text.replace(str(work / "runs"), "runs").replace(
        "epochs: 3, warmup_epochs: 1", "epochs: 1, warmup_epochs: 0"
    )
    (work / "tiny.yaml").write_text(text)
    monkeypatch.chdir(work)
    assert run(train_tool.main, ["tiny.yaml", "optim.warmup_epochs=0", "--cpu"]) == 0
    saved = (work / "runs" / "tiny" / "config.yaml").read_text()
    assert f"root: {work / 'data'}" in saved and f"checkpoint: {work / 'vit.safetensors'}" in saved
    assert saved.startswith("# made by visionpeft") and saved.splitlines()[0].endswith(
        "visionpeft train tiny.yaml optim.warmup_epochs=0 --cpu"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "eval.py"), str(work / "runs" / "tiny")],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "top1" in result.stdout


def test_a_finished_run_leaves_a_model_card_the_hub_parses(straight):
    from huggingface_hub import ModelCard

    card = ModelCard.load(straight / "README.md")
    assert card.data.pipeline_tag == "image-classification" and card.data.library_name == "visionpeft"
    assert card.data.base_model is None  # a local file is named in the text; the metadata takes hub ids only
    assert str((straight.parent.parent / "vit.safetensors").resolve()) in card.text
    assert "vpt" in card.data.tags
    assert "| vpt | 64 |" in card.text and "test/top1" in card.text and "visionpeft train" in card.text


def test_step_checkpoints_resume_inside_an_epoch_and_keep_only_the_newest(config, straight, monkeypatch):
    """Killed right after the step-10 checkpoint (inside epoch 2 of 7-step epochs): the resume skips the batches
    epoch 2 had used and repeats the uninterrupted run's losses (no random augmentation here)."""
    keep = run_state.keep_step_checkpoint

    def killed_at_ten(run_dir, step, limit):
        keep(run_dir, step, limit)
        if step == 10:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_state, "keep_step_checkpoint", killed_at_ten)
    args = ["train.checkpoint_every=5", "train.checkpoints_total_limit=2"]
    assert _train(config, "steps", *args) == 130
    run_dir = config.parent / "runs" / "steps"
    assert run_state.read_progress(run_dir / "state")["step"] == 10
    monkeypatch.setattr(run_state, "keep_step_checkpoint", keep)
    assert _resume(config, "steps") == 0
    assert _losses(config, "steps") == _losses(config, "straight")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000015", "step-0000020"]
