"""The cluster executors run the same pending list as the local one: submitit (its local executor: one process per
job) and Ray (a local cluster started by the test). Each needs its extra (``[slurm]``, ``[ray]``)."""

from __future__ import annotations

import pytest
from _sweep_utils import DIGITS, FAST

from visionpeft.sweep.executors import RayExecutor, SubmititExecutor
from visionpeft.sweep.protocol import final_runs
from visionpeft.sweep.runs import read_result
from visionpeft.sweep.spec import make_spec


def _pending(root):
    """Two runs of the digits demo (two steps each): one per learning rate."""
    spec = make_spec(DIGITS, {"vpt": {"optim.lr": [0.02, 0.001]}}, ["digits"], [0], "none", "final", FAST)
    return final_runs(spec, root)


def _check(executor, root) -> dict[str, float]:
    runs = _pending(root)
    seen = []
    records = executor.run(runs, lambda run, record: seen.append(run.path.name))
    assert sorted(seen) == sorted(run.path.name for run in runs)
    assert [r["status"] for r in records] == ["done", "done"]
    results = {run.path.name: read_result(run.path) for run in runs}
    assert all(r["test"]["top1"] > 0.05 and r["trainable"] == 11_146 for r in results.values())
    assert executor.run(runs, lambda run, record: None)[0].get("skipped")  # finished runs are not redone
    return {name: r["test"]["top1"] for name, r in results.items()}


def test_submitit_and_ray_run_the_same_pending_list(tmp_path):
    pytest.importorskip("submitit", reason='needs pip install "visionpeft[slurm]"')
    by_submitit = _check(SubmititExecutor(tmp_path / "submitit", workers=2, cluster="local", cpus_per_job=1,
                                          gpus_per_job=0, timeout_min=10), tmp_path / "a")  # fmt: skip
    pytest.importorskip("ray", reason='needs pip install "visionpeft[ray]"')
    import ray

    try:
        by_ray = _check(RayExecutor(workers=2), tmp_path / "b")
    finally:
        ray.shutdown()
    assert by_ray.keys() == by_submitit.keys()  # the same runs: same names under both sweep folders
    for name, top1 in by_ray.items():  # and the same training (CPU threads may differ: a prediction may flip)
        assert top1 == pytest.approx(by_submitit[name], abs=0.01)
