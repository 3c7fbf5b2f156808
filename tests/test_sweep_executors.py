"""The cluster executors run the same pending list as a plain in-process loop, with the same results: submitit (its
local executor: one process per job) and Ray (a local cluster started by the test). Each test skips cleanly when
its extra (``[slurm]``, ``[ray]``) is not installed."""

from __future__ import annotations

import pytest
from _sweep_utils import DIGITS, FAST

from visionpeft.sweep.executors import RayExecutor, SubmititExecutor
from visionpeft.sweep.protocol import final_runs
from visionpeft.sweep.runs import execute, read_result
from visionpeft.sweep.spec import make_spec


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


def test_killing_the_sweep_ends_its_local_workers(tmp_path):
    # an orphaned worker would go on training in a run folder that the next start of the sweep clears
    import subprocess
    import sys
    import time
    from pathlib import Path

    psutil = pytest.importorskip("psutil")
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    tests = Path(__file__).resolve().parent
    script = f"""
import sys
sys.path.insert(0, {str(tests)!r})
from _sweep_utils import DIGITS, FAST
from visionpeft.sweep.executors import LocalExecutor
from visionpeft.sweep.protocol import final_runs
from visionpeft.sweep.spec import make_spec
from pathlib import Path
long_run = [*FAST, "optim.steps=100000"]
spec = make_spec(DIGITS, {{"vpt": {{"optim.lr": [0.01]}}}}, ["digits"], [0], "none", "final", long_run)
LocalExecutor(1).run(final_runs(spec, Path({str(tmp_path)!r})), lambda run, record: None)
"""
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not list(tmp_path.rglob("log.txt")) and time.time() < deadline:  # the worker has started its run
            assert driver.poll() is None, driver.stderr.read().decode()[-1500:]
            time.sleep(0.5)
        workers = psutil.Process(driver.pid).children(recursive=True)
        assert workers
    finally:
        driver.kill()
        driver.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, [p.pid for p in alive]
