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


@pytest.mark.slow
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


def _claim(run_dir, start, queue) -> None:
    """One of the racing processes: waits for the start, claims a folder for ``run_dir``, reports which."""
    start.wait()
    queue.put(str(run_state.claim_new_folder(run_dir)))


def test_folders_claimed_at_the_same_moment_are_all_different(tmp_path):
    """Eight processes claiming a new run folder under one name at the same moment get eight folders (`NAME`,
    `NAME-2`, ...): choosing the free name and creating the folder are one step."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start, queue = context.Event(), context.Queue()
    racers = [context.Process(target=_claim, args=(tmp_path / "runs" / "same", start, queue)) for _ in range(8)]
    for racer in racers:
        racer.start()
    start.set()
    claimed = sorted(queue.get(timeout=120) for _ in racers)
    for racer in racers:
        racer.join(timeout=60)
    names = {"same", *(f"same-{n}" for n in range(2, 9))}
    assert len(set(claimed)) == 8 and {p.rsplit("/", 1)[-1] for p in claimed} == names


@pytest.mark.slow
def test_two_trainings_started_at_once_with_one_name_keep_their_own_folders(config):
    """Two `tools/train.py` processes with the same `train.run_name` started at once: each trains in a folder of
    its own (`NAME` and `NAME-2`), each with its own config, metrics and adapters; neither is mixed into the
    other."""
    import subprocess

    command = [sys.executable, str(ROOT / "tools" / "train.py"), str(config), "train.run_name=twin", "--cpu"]
    runs = [subprocess.Popen([*command, f"train.seed={seed}"], stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    errors = [run.communicate(timeout=600)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    folders = [config.parent / "runs" / name for name in ("twin", "twin-2")]
    seeds = sorted(int(f.joinpath("config.yaml").read_text().split("seed: ")[1].split()[0]) for f in folders)
    assert seeds == [1, 2]
    for folder in folders:
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if "train/loss" in r]
        assert steps == sorted(steps) and len(steps) == len(set(steps))  # one run's records, not two interleaved
        assert (folder / "last").is_dir() and (folder / "README.md").is_file()


def test_overwrite_refuses_a_folder_that_is_not_a_run_by_its_own_record(config, capsys):
    """`--overwrite` on a folder that merely holds files named like a run's (`config.yaml`, `last`) beside the
    user's own: refused in one line, nothing deleted (a run folder is one whose `config.yaml` visionpeft wrote)."""
    folder = config.parent / "runs" / "project"
    (folder / "last").mkdir(parents=True)
    (folder / "config.yaml").write_text("model: mine\n")
    (folder / "thesis.tex").write_text("years of work")
    assert _train(config, "project", "--overwrite", "--stop-after", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --overwrite refused: {folder} is not a run folder"), err
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "last", "thesis.tex"]
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_overwrite_deletes_only_a_run_and_refuses_one_holding_foreign_files(config, capsys):
    """`--overwrite` of a real run beside which the user put a file of their own: refused in one line naming the
    foreign file, nothing deleted; once it is moved away, the run's own files are replaced."""
    assert _train(config, "crowded", "--stop-after", "1") == 0
    folder = config.parent / "runs" / "crowded"
    (folder / "notes.txt").write_text("mine")
    before = sorted(p.name for p in folder.iterdir())
    capsys.readouterr()
    assert _train(config, "crowded", "--overwrite", "--stop-after", "1") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --overwrite refused: {folder} holds files that are not the run's (notes.txt); move them elsewhere "
        "and try again (nothing was deleted)"
    )
    assert sorted(p.name for p in folder.iterdir()) == before
    (folder / "notes.txt").unlink()
    assert _train(config, "crowded", "--overwrite", "--stop-after", "1") == 0
    assert "--overwrite: deleted the earlier run in" in capsys.readouterr().err
    assert not (config.parent / "runs" / "crowded-2").exists()


def test_a_run_folder_in_use_is_neither_resumed_nor_overwritten(config, straight, capsys):
    """A run folder whose lock another process holds (it is training there): `--resume` and `--overwrite` are one
    line naming the holder (pid, host, since); nothing in the folder changes."""
    import os

    from visionpeft.locks import FolderLock

    before = {p.name: p.stat().st_mtime_ns for p in straight.iterdir() if not p.name.startswith("run.lock")}
    with FolderLock(straight, run_state.RUN_LOCK, "a training run"):
        for args in (["--resume", str(straight), "--cpu"], [str(config), "train.run_name=straight", "--overwrite"]):
            assert run(train_tool.main, args) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"{straight} is in use by a training run (pid {os.getpid()} on " in err[0], err
    assert {p.name: p.stat().st_mtime_ns for p in straight.iterdir() if not p.name.startswith("run.lock")} == before


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("no_best", lambda p: p.pop("best"), "lacks 'best'"),
        ("text_step", lambda p: p.update(step="ten"), "has 'step': \"ten\", which is not a count"),
        (
            "null_loss",
            lambda p: p.update(epoch_loss=None),
            "has 'epoch_loss': null, which is not a [loss sum, batches] pair",
        ),
    ],
)
def test_a_damaged_progress_file_is_one_line_offering_the_previous_state(config, capsys, name, damage, message):
    """A state whose `progress.json` lacks a key or holds a wrong type: one line naming the file before anything is
    built; when the previous complete state is still beside it, the line says so and how to resume from it, and the
    recovery keeps it."""
    assert _train(config, name, "--stop-after", "1") == 0
    run_dir = config.parent / "runs" / name
    shutil.copytree(run_dir / "state", run_dir / "state.old")  # as if killed before the previous state was deleted
    progress = json.loads((run_dir / "state" / "progress.json").read_text())
    damage(progress)
    (run_dir / "state" / "progress.json").write_text(json.dumps(progress))
    capsys.readouterr()
    assert _resume(config, name) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run_dir / 'state' / 'progress.json'} {message}"), err
    assert f"the previous complete state {run_dir / 'state.old'} (step 7) is intact" in err[0]
    run_state.recover_state(run_dir)  # what a resume does first: it must not delete the intact state
    assert run_state.progress_problem(run_dir / "state.old") is None


def test_a_metrics_line_that_is_not_a_record_is_one_line(config, capsys):
    """A `metrics.jsonl` line that is JSON but not a record (a list): one line naming the file and the line, before
    anything is built."""
    assert _train(config, "listed", "--stop-after", "1") == 0
    log = config.parent / "runs" / "listed" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "[1, 2]", *lines[1:]]) + "\n")
    capsys.readouterr()
    assert _resume(config, "listed") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {log} line 2 is not a metrics record (a JSON object with a numeric step); fix or delete that line"
    )


@pytest.mark.parametrize("value", ["0", "-2"])
def test_stop_after_zero_is_refused_before_any_folder(config, capsys, value):
    """`--stop-after 0` (or less) would leave a folder that cannot be resumed: one line, no folder."""
    assert _train(config, "stopped", "--stop-after", value) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --stop-after takes the number of epochs to train before stopping, at least 1, got {value}"
    )
    assert not (config.parent / "runs" / "stopped").exists()


def test_a_run_name_longer_than_the_file_system_takes_is_one_line(config, capsys):
    """`train.run_name` longer than the file system's name limit (with room for a `-N` suffix): one line with the
    other name rules, before anything is built, `--dry-run` included."""
    import os

    limit = os.pathconf(config.parent, "PC_NAME_MAX")
    for args in (["--dry-run"], []):
        assert _train(config, "x" * (limit - 2), *args) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: train.run_name is {limit - 2} bytes long; the file system of {config.parent / 'runs'} takes "
            f"names of up to {limit} bytes, so a run name may have {limit - 4} (room for a -N suffix)"
        )


def _names_written_into_run_folders() -> set[str]:
    """The names the library's code writes at the top of a run folder: ``run_dir / "name"`` (also
    ``self.run_dir``, ``request.run_dir``) with a string literal or a module constant holding one."""
    import ast

    package = ROOT / "visionpeft"
    found = set()
    for path in package.rglob("*.py"):
        if "sweep" in path.parts:
            continue  # a sweep's run folders hold the trainer's folder as train/, named by runs.py
        tree = ast.parse(path.read_text())
        constants = {
            target.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for target in node.targets
            if isinstance(target, ast.Name) and isinstance(node.value.value, str)
        }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)):
                continue
            left = node.left.attr if isinstance(node.left, ast.Attribute) else getattr(node.left, "id", "")
            if left != "run_dir":
                continue
            right = node.right
            if isinstance(right, ast.Constant) and isinstance(right.value, str):
                found.add(right.value)
            elif isinstance(right, ast.Name) and right.id in constants:
                found.add(constants[right.id])
    return found


def test_every_name_a_trainer_writes_is_a_run_output():
    """`--overwrite` deletes a run's own files only (`run_state.RUN_OUTPUTS`); every name the trainers, tasks and
    commands write into a run folder is in that list, so a finished run of any task can be overwritten."""
    written = _names_written_into_run_folders()
    assert {"config.yaml", "last", "best", "adapter", "vae", "pipeline"} <= written  # the scan sees them
    assert {name for name in written if not run_state.is_run_output(name)} == set()


def test_a_finished_run_holds_only_its_own_files_and_is_a_run_by_its_record(straight):
    assert run_state.is_run(straight)
    assert [p.name for p in straight.iterdir() if not run_state.is_run_output(p.name)] == []
