"""The cluster executors run the same pending list as a plain in-process loop, with the same results: submitit (its
local executor: one process per job) and Ray (a local cluster started by the test). Each test skips cleanly when
its extra (``[slurm]``, ``[ray]``) is not installed."""

from __future__ import annotations

import pytest
from _sweep_utils import DIGITS, FAST

from visionpeft.sweep.executors import RayExecutor, SubmititExecutor
from visionpeft.sweep.plan import final_runs
from visionpeft.sweep.runs import execute, read_result
from visionpeft.sweep.spec import make_spec

pytestmark = pytest.mark.slow  # every test here drives a sweep end to end


def _pending(root):
    """Two runs of the digits demo (two steps each): one per learning rate."""
    spec = make_spec(DIGITS, {"vpt": {"optim.lr": [0.02, 0.001]}}, ["digits"], [0], "none", "final", FAST)
    return final_runs(spec, root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, float]:
    """Test top-1 of each run, trained in this process one after the other."""
    runs = _pending(tmp_path_factory.mktemp("reference"))
    return {run.path.name: execute(run)["test"]["top1"] for run in runs}


def _check(executor, root, reference: dict[str, float]) -> None:
    runs = _pending(root)
    seen = []
    records = executor.run(runs, lambda run, record: seen.append(run.path.name))
    assert sorted(seen) == sorted(reference)  # the same runs: the same names under another sweep folder
    assert [r["status"] for r in records] == ["done", "done"]
    for run in runs:
        result = read_result(run.path)
        assert result["trainable"] == 11_146
        # the same training; CPU thread counts differ between engines, so one prediction in 360 may flip
        assert result["test"]["top1"] == pytest.approx(reference[run.path.name], abs=0.01)
    assert all(r.get("skipped") for r in executor.run(runs, lambda run, record: None))  # finished: not redone


def test_submitit_runs_the_pending_list(tmp_path, reference):
    pytest.importorskip("submitit", reason='needs pip install "visionpeft[slurm]"')
    executor = SubmititExecutor(
        tmp_path / "submitit", workers=2, cluster="local", cpus_per_job=1, gpus_per_job=0, timeout_min=10
    )
    _check(executor, tmp_path / "sweep", reference)
    assert list((tmp_path / "submitit").glob("*_log.out"))  # the jobs went through submitit


def test_a_multi_gpu_slurm_job_trains_its_run_in_one_process_per_gpu(tmp_path, reference):
    # gpus_per_job=2: accelerate launch inside the job (here: 2 gloo CPU processes, no GPU), the same global batch
    pytest.importorskip("submitit", reason='needs pip install "visionpeft[slurm]"')
    executor = SubmititExecutor(tmp_path / "submitit", cluster="debug", gpus_per_job=2, timeout_min=10)
    runs = _pending(tmp_path / "sweep")[:1]
    (record,) = executor.run(runs, lambda run, record: None)
    assert record["status"] == "done", record
    result = read_result(runs[0].path)
    assert result["processes"] == 2 and result["trainable"] == 11_146  # the world size the processes saw
    assert result["test"]["top1"] == pytest.approx(reference[runs[0].path.name], abs=0.02)


def test_ray_runs_the_pending_list(tmp_path, reference):
    ray = pytest.importorskip("ray", reason='needs pip install "visionpeft[ray]"')
    try:
        _check(RayExecutor(workers=2), tmp_path / "sweep", reference)
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2  # the local cluster the executor started
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_two_drivers_on_one_folder_and_a_killed_driver_leaves_no_worker(tmp_path, capsys, caplog):
    """Two sweep drivers on one folder: the second says which driver holds it (pid, host, since) in one line and
    trains nothing. `kill -9` of the first ends its worker and the worker's own DataLoader processes (spawned, so
    no death signal of their own); the next driver takes the stale lock over with a warning."""
    import logging
    import os
    import signal
    import subprocess
    import sys
    import time

    from _sweep_utils import ROOT, sweep, write_grid

    from visionpeft.locks import FolderLock

    psutil = pytest.importorskip("psutil")
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    grid = write_grid(tmp_path, "vpt", "optim.lr: [0.01, 0.02]\n")
    out = tmp_path / "sweep"
    args = [DIGITS, *FAST, "optim.steps=100000", "data.num_workers=2", "--grid", grid, "--out", out, "--workers", "1"]
    command = [sys.executable, str(ROOT / "tools" / "sweep.py"), *map(str, args)]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not list(out.rglob("metrics.jsonl")) and time.time() < deadline:  # training, its loader prefetching
            assert driver.poll() is None, driver.stderr.read().decode()[-1500:]
            time.sleep(0.5)
        family = psutil.Process(driver.pid).children(recursive=True)
        assert any(p.ppid() != driver.pid for p in family), "the worker started no DataLoader worker"
        code, _, err = sweep(args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{out} is in use by a sweep driver (pid {driver.pid} on " in err and "since " in err
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    _, alive = psutil.wait_procs(family, timeout=3)  # at once (torch's own watchdog would take 5 s or more)
    alive = [p for p in alive if _running(p, psutil)]  # a zombie has ended (this container's init may not reap it)
    assert not alive, [(p.pid, p.name()) for p in alive]
    with caplog.at_level(logging.WARNING, logger="visionpeft.locks"), FolderLock(out, "sweep", "a sweep driver"):
        assert f"took over the lock of a sweep driver (pid {driver.pid} on " in caplog.text


def _running(process, psutil) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_worker_whose_driver_died_while_it_started_ends_at_once(tmp_path):
    """The driver killed while a worker was still starting (before the death signal was armed): the worker sees
    that its parent is no longer the driver and ends, with the processes it started."""
    import subprocess
    import sys

    code = "from visionpeft.sweep.executors import die_with_driver; die_with_driver(1); import time; time.sleep(60)"
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    done = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
    assert done.returncode == 128 + 15, done.stderr
