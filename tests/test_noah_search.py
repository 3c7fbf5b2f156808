"""NOAH's search (official ``evolution.py``): the evolution finds the best subnet of a planted score within the
budget, mutates depths only and crosses whole modules; the scoring jobs run on the sweep executors (the local pool),
resume from their folders and fail in one line; budgets no subnet meets are one line; end to end on a tiny supernet
trained here, the search writes its history, subnet and retrain config, and the retrain runs through the sweep."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict
from functools import partial
from pathlib import Path

import pytest

from visionpeft.cli.noah import parameter_count
from visionpeft.errors import ConfigError
from visionpeft.methods import make_config
from visionpeft.methods.noah import MODULES, Geometry, subnet_parameters
from visionpeft.sweep.noah import Evolution, SearchSettings, check_budget, key_of
from visionpeft.sweep.noah_jobs import JobScorer, ScoreJob, ScoringFailed, score_job

#: two blocks, widths 1 / 2 / 3 in the first 1 or 2 blocks: (3 + 9) ** 3 = 1,728 subnets
SPACE = make_config(
    "noah",
    {
        **{f"{m}_depths": [1, 2] for m in MODULES},
        "vpt_tokens": [1, 2, 3],
        "lora_ranks": [1, 2, 3],
        "adapter_dims": [1, 2, 3],
    },
)
GEOMETRY = Geometry(layers=2, width=8, qkv=24)
WEIGHTS = {"vpt": (1.0, 0.31), "lora": (0.72, 0.113), "adapter": (0.057, 0.93)}


def planted(subnet) -> float:
    """A score with one best subnet under any budget (distinct weights per module and block)."""
    return sum(w * v for m in MODULES for w, v in zip(WEIGHTS[m], subnet[m])) / 20


def every_subnet():
    per_module = [
        [tuple(w) + (0,) * (2 - d) for d in SPACE.depths(m) for w in itertools.product(SPACE.widths(m), repeat=d)]
        for m in MODULES
    ]
    return [dict(zip(MODULES, choice)) for choice in itertools.product(*per_module)]


def brute_force_best(budget: int):
    legal = [s for s in every_subnet() if subnet_parameters(s, GEOMETRY) <= budget]
    return max(legal, key=planted)


SETTINGS = SearchSettings(budget=250, population=20, select=5, mutation=8, crossover=8, generations=10, seed=1)


def test_the_evolution_finds_the_best_subnet_of_a_planted_score_within_the_budget():
    calls = []

    def score(candidates, generation):
        calls.append((generation, len(candidates)))
        return [planted(c) for c in candidates]

    evolution = Evolution(SPACE, GEOMETRY, SETTINGS, score)
    best = evolution.run()
    assert key_of(best.subnet) == key_of(brute_force_best(SETTINGS.budget))
    assert max(planted(s) for s in every_subnet()) > best.top1  # the budget excluded better subnets
    scored = evolution.state.scored.values()
    assert all(s.parameters == subnet_parameters(s.subnet, GEOMETRY) <= SETTINGS.budget for s in scored)
    assert [g for g, _ in calls] == list(range(SETTINGS.generations + 1))
    assert all(0 < n <= SETTINGS.population for _, n in calls)
    assert sum(n for _, n in calls) == len(evolution.state.scored)  # no subnet scored twice
    assert len(evolution.state.scored) < len(every_subnet()) / 4  # found, not enumerated


def test_mutation_changes_depths_only_and_crossover_takes_each_module_whole():
    evolution = Evolution(SPACE, GEOMETRY, SearchSettings(m_prob=1.0, s_prob=1.0), lambda c, g: [0.0] * len(c))
    evolution.rng = random.Random(0)
    parent = {"vpt": (3, 2), "lora": (2, 0), "adapter": (1, 3)}
    depths = set()
    for _ in range(200):
        mutant = evolution.mutant([key_of(parent)])
        for m in MODULES:
            depth = sum(1 for v in mutant[m] if v)
            kept = min(depth, sum(1 for v in parent[m] if v))
            assert mutant[m][:kept] == parent[m][:kept] and all(v in SPACE.widths(m) for v in mutant[m][:depth])
            depths.add((m, depth))
    assert depths == {(m, d) for m in MODULES for d in (1, 2)}
    other = {"vpt": (1, 0), "lora": (3, 3), "adapter": (2, 0)}
    for _ in range(50):
        child = evolution.child([key_of(parent), key_of(other)])
        assert all(child[m] in (parent[m], other[m]) for m in MODULES)


def test_a_budget_no_subnet_meets_and_bad_settings_are_one_line():
    smallest = {m: (1, 0) for m in MODULES}
    low = subnet_parameters(smallest, GEOMETRY)
    check_budget(SPACE, GEOMETRY, SearchSettings(budget=low))
    with pytest.raises(ConfigError, match=f"fits the budget of {low - 1:,} parameters: the smallest trains {low:,}"):
        check_budget(SPACE, GEOMETRY, SearchSettings(budget=low - 1))
    with pytest.raises(ConfigError, match="reaches the minimum of 1,000,000 parameters: the largest trains"):
        check_budget(SPACE, GEOMETRY, SearchSettings(budget=2_000_000, min_budget=1_000_000))
    with pytest.raises(ConfigError, match="min budget 10 is above the budget 5"):
        SearchSettings(budget=5, min_budget=10)
    with pytest.raises(ConfigError, match=r"m_prob must be within \[0, 1\], got 2"):
        SearchSettings(m_prob=2)
    with pytest.raises(ConfigError, match="population must be positive"):
        SearchSettings(population=0)


def test_parameter_counts_are_read_with_units():
    import argparse

    assert parameter_count("0.64M") == 640_000 == parameter_count("640K") == parameter_count("640000")
    with pytest.raises(argparse.ArgumentTypeError, match="must be a parameter count"):
        parameter_count("lots")


def planted_job(job: ScoreJob) -> list[float]:
    """A scoring job's planted scores (module level: the local pool's spawned workers import it)."""
    return [planted(c) for c in job.candidates]


def failing_job(job: ScoreJob) -> list[float]:
    raise RuntimeError("the GPU fell off")


class InProcess:
    """Runs jobs one after the other in this process, as an executor would (a test double)."""

    def run(self, jobs, on_done, worker):
        for job in jobs:
            on_done(job, worker(asdict(job)))


def test_scoring_jobs_split_the_generation_resume_from_their_folders_and_fail_in_one_line(tmp_path):
    lines = []
    scorer = JobScorer(InProcess(), tmp_path, tmp_path / "run", "last", "val", jobs=3, out=lines.append)
    scorer.worker = partial(score_job, score=planted_job)
    candidates = every_subnet()[:7]
    assert scorer(candidates, 0) == [planted(c) for c in candidates]
    assert len(list((tmp_path / "jobs").iterdir())) == 3 and lines[-1].endswith("in 3 jobs, 3 to run")
    scorer.worker = partial(score_job, score=failing_job)  # finished jobs are read, never run again
    assert scorer(candidates, 0) == [planted(c) for c in candidates] and lines[-1].endswith("0 to run")
    with pytest.raises(ScoringFailed, match="failed: RuntimeError: the GPU fell off") as err:
        scorer(candidates[:2], 1)
    assert "\n" not in str(err.value) and "traceback in" in str(err.value)


def planted_worker(fields: dict) -> dict:
    """:func:`score_job` with the planted scores, as a plain module-level function (Ray's remote wants one)."""
    return score_job(fields, score=planted_job)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["local", "submitit", "ray"])
def test_the_search_runs_its_jobs_on_each_executor(engine, tmp_path, monkeypatch):
    from visionpeft.sweep import executors

    if engine != "local":
        pytest.importorskip(engine, reason=f"needs the {engine} extra")
        # the engines start fresh interpreters: they find this module (the planted worker) on PYTHONPATH
        monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    executor = {
        "local": lambda: executors.LocalExecutor(workers=2),
        "submitit": lambda: executors.SubmititExecutor(
            tmp_path / "submitit", workers=2, cluster="local", cpus_per_job=1, gpus_per_job=0, timeout_min=10
        ),
        "ray": lambda: executors.RayExecutor(workers=2),
    }[engine]()
    scorer = JobScorer(executor, tmp_path, tmp_path / "run", "last", "val", jobs=2, worker=planted_worker)
    settings = SearchSettings(budget=250, population=12, select=4, mutation=6, crossover=6, generations=2, seed=1)
    evolution = Evolution(SPACE, GEOMETRY, settings, scorer)
    try:
        best = evolution.run()
    finally:
        if engine == "ray":
            import ray

            ray.shutdown()
    assert best.top1 == max(s.top1 for s in evolution.state.scored.values())
    assert all(s.parameters <= settings.budget for s in evolution.state.scored.values())
    assert len(list((tmp_path / "jobs").glob("g0*/result.json"))) == 3 * 2  # 2 jobs per generation
    if engine == "submitit":
        assert list((tmp_path / "submitit").glob("*_log.out"))  # the jobs went through submitit


# -- end to end on a tiny supernet ------------------------------------------------------------------------------


def write_images(root: Path) -> None:
    """Three classes of 32 px images (a colour each, with noise), split into train / val / test."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 6), ("test", 6)):
        for label, colour in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(colour, 60, (32, 32, 3)), 0, 255).astype("uint8")
                Image.fromarray(pixels).save(folder / f"{i}.png")


SUPERNET = """
model: {{library: timm, name: vit_tiny_patch16_224, pretrained: false, img_size: 32,
        kwargs: {{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}}}}
method: {{name: noah, vpt_depths: [1, 2], lora_depths: [1, 2], adapter_depths: [1, 2], vpt_tokens: [1, 2],
         lora_ranks: [1, 2], adapter_dims: [1, 2]}}
data: {{name: imagefolder, root: {root}, train_split: train, val_split: val, test_split: test, img_size: 32,
       batch_size: 12, eval_batch_size: 36, num_workers: 0}}
optim: {{name: adamw, lr: 0.01, epochs: null, steps: 6, warmup_epochs: null}}
train: {{output_dir: {out}, run_name: supernet, report_to: none}}
"""


@pytest.fixture(scope="module")
def supernet(tmp_path_factory) -> Path:
    from visionpeft.config import load_config
    from visionpeft.trainers.classification import run

    folder = tmp_path_factory.mktemp("noah")
    write_images(folder / "images")
    (folder / "supernet.yaml").write_text(SUPERNET.format(root=folder / "images", out=folder / "runs"))
    run(load_config(folder / "supernet.yaml"), folder / "runs" / "supernet")
    return folder / "runs" / "supernet"


def search(argv, capsys):
    from visionpeft.cli.common import run
    from visionpeft.cli.noah import main

    code = run(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


SMALL = ["--population", 6, "--select", 3, "--mutation", 3, "--crossover", 3, "--generations", 1]


@pytest.mark.slow
def test_search_and_retrain_of_a_tiny_supernet_end_to_end(supernet, tmp_path, capsys):
    out = tmp_path / "search"
    argv = [supernet, "--budget", "0.7K", "--out", out, *SMALL, "--workers", 2, "optim.steps=2"]
    code, text, err = search([*argv, "--retrain-seeds", 0], capsys)
    assert code == 0, err
    chosen = json.loads((out / "subnet.json").read_text())
    history = json.loads((out / "history.json").read_text())
    scored = [c for g in history["generations"] for c in g["population"]]
    assert chosen["top1"] == max(c["top1"] for c in scored) and chosen["parameters"] <= 700
    assert all(c["parameters"] <= 700 for c in scored) and len(history["generations"]) == 2
    assert history["geometry"] == {"layers": 2, "width": 32, "qkv": 96}
    result = json.loads(next((out / "retrain" / "runs").glob("*/noah/final-s0-*/result.json")).read_text())
    assert result["trainable"] - result["head"] == chosen["parameters"]  # the retrain trains exactly the subnet
    from visionpeft.config import load_config

    retrain = load_config(out / "retrain.yaml")
    assert retrain.method.mode == "subnet" and retrain.optim.steps == 2
    assert {m: list(v) for m, v in retrain.method.subnet.items()} == chosen["subnet"]
    # started again: the finished jobs are read back, the same subnet chosen
    code, text, err = search(argv, capsys)
    assert code == 0 and "2 jobs, 0 to run" in text
    assert json.loads((out / "subnet.json").read_text())["subnet"] == chosen["subnet"]
    # another search in the same folder, and a run folder that holds no supernet: one line each, nothing run
    code, _, err = search([supernet, "--budget", "0.8K", "--out", out, *SMALL], capsys)
    assert code == 2 and "holds another search (different settings)" in err and err.count("\n") == 1
    retrained = next((out / "retrain" / "runs").glob("*/noah/final-s0-*/train"))
    code, _, err = search([retrained, "--out", tmp_path / "other"], capsys)
    assert code == 2 and "holds a noah subnet; the search needs a supernet" in err and err.count("\n") == 1


@pytest.mark.slow
def test_bad_inputs_of_the_search_are_one_line_before_any_job(supernet, tmp_path, capsys):
    out = tmp_path / "search"
    for argv, words in (
        ([supernet, "--budget", "100"], "no subnet of the search space fits the budget of 100 parameters"),
        ([supernet, "--split", "nope"], "nope"),
        ([tmp_path], "is an empty folder"),
        ([supernet, "--adapter", "best2"], "best2 does not exist"),
        ([supernet, "optim.lrr=1"], "optim.lrr"),
    ):
        code, _, err = search([*argv, "--out", out], capsys)
        assert code == 2 and words in err and err.count("\n") == 1, err
    assert not (out / "jobs").exists()
