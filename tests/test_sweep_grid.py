"""Grid files: lists are axes, scalars fixed, nested keys, list values, linked keys; run names are stable hashes."""

from __future__ import annotations

import pytest
from _sweep_utils import ROOT, VTAB_CONFIG, write_grid

from visionpeft.errors import ConfigError
from visionpeft.sweep.grid import expand, read_grid
from visionpeft.sweep.runs import run_hash


def test_lists_are_axes_multiplied_in_file_order_and_scalars_are_fixed():
    points = expand({"optim.lr": [0.1, 0.01], "optim.weight_decay": 0.0, "method.r": [1, 8, 32]})
    assert len(points) == 6
    assert [p.choices for p in points[:3]] == [
        (("optim.lr", "0.1"), ("method.r", str(r))) for r in (1, 8, 32)
    ]  # the last axis changes fastest
    assert all("optim.weight_decay=0.0" in p.overrides for p in points)
    assert points[-1].overrides == ("optim.weight_decay=0.0", "optim.lr=0.01", "method.r=32")


def test_nested_keys_equal_dotted_ones():
    nested = expand({"optim": {"lr": [0.1, 0.2], "schedule": "linear"}, "model": {"kwargs": {"depth": 2}}})
    dotted = expand({"optim.lr": [0.1, 0.2], "optim.schedule": "linear", "model.kwargs.depth": 2})
    assert [p.overrides for p in nested] == [p.overrides for p in dotted]
    assert nested[0].overrides == ("optim.schedule=linear", "model.kwargs.depth=2", "optim.lr=0.1")


def test_a_list_value_is_written_as_a_one_point_axis_and_is_not_a_choice():
    (point,) = expand({"method.targets": [["q", "k", "v"]]})
    assert point.overrides == ("method.targets=[q, k, v]",)
    assert point.choices == ()  # one value: nothing was chosen


def test_the_whole_method_goes_before_its_options_wherever_it_is_written():
    (point,) = expand({"method.num_tokens": 10, "method": {"name": "vpt", "deep": True}})
    assert point.overrides == ("method={deep: true, name: vpt}", "method.num_tokens=10")  # mappings: sorted keys


def test_an_axis_of_mappings_moves_keys_together():
    linked = expand({"method": [{"name": "lora", "r": 1, "alpha": 1}, {"name": "lora", "r": 8, "alpha": 8}]})
    assert [p.overrides for p in linked] == [
        ("method={alpha: 1, name: lora, r: 1}",),
        ("method={alpha: 8, name: lora, r: 8}",),
    ]
    bundles = expand({"optim": [{"lr": 0.1, "weight_decay": 0.01}, {"lr": 0.2, "weight_decay": 0.0}]})
    assert bundles[1].overrides == ("optim.lr=0.2", "optim.weight_decay=0.0")


def test_grid_files_read_1e_minus_3_as_a_number(tmp_path):
    grid = read_grid(write_grid(tmp_path, "g", "optim.lr: [1e-3, 1.0e-2, 5]\nmethod.name: 1e3x\n"))
    assert grid == {"optim.lr": [0.001, 0.01, 5], "method.name": "1e3x"}


def test_empty_axis_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="grid 'x': axis 'optim.lr' is empty"):
        expand({"optim.lr": [], "optim.weight_decay": [0.1]}, "grid 'x'")


#: PETL_Vision's grids (experiment/config/method/<their name>.yml at commit 245d262): 4 lr x wd points times the
#: method's own axes.
PETL_VISION_GRID_SIZES = {
    "lora": 16,
    "vpt_deep": 16,
    "vpt_shallow": 20,
    "adaptformer": 36,
    "convpass": 80,
    "bitfit": 4,
    "difffit": 4,
    "full": 4,
    "linear": 4,
    "ssf": 4,  # ssf.yml: no axis of its own
    "ln_tune": 4,  # ln.yml: no axis of its own
    "fact_tt": 4 * 3 * 5,  # fact_dim 8 / 16 / 32 x fact_scaler 0.01 ... 100
    "fact_tk": 4 * 3 * 5,  # fact_dim 16 / 32 / 64 x fact_scaler 0.01 ... 100
    "repadapter": 4 * 3 * 5,  # repadapter_bottleneck 8 / 16 / 32 x repadapter_scaler 0.1 ... 10
    "adapter_houlsby": 4 * 4 * 4,  # rand_h_adapter.yml: adapter_bottleneck 4 ... 32 x adapter_scaler 0.01 ... 10
    "adapter_pfeiffer": 4 * 5 * 4,  # lora_p_adapter.yml: adapter_bottleneck 4 ... 64 x adapter_scaler 0.01 ... 10
}
SHIPPED_GRIDS = sorted(
    path for path in (ROOT / "grids").glob("*.yaml") if not path.stem.startswith("demo")
)  # not specs


def test_the_shipped_grids_have_petl_visions_sizes():
    assert {path.stem: len(expand(read_grid(path))) for path in SHIPPED_GRIDS} == PETL_VISION_GRID_SIZES


def _method_name(grid: dict) -> str:
    """The method a grid trains (``method: name``, ``method: {name: ...}`` or an axis of such mappings)."""
    method = grid["method"]
    method = method[0] if isinstance(method, list) else method
    return method["name"] if isinstance(method, dict) else method


@pytest.mark.parametrize("path", SHIPPED_GRIDS, ids=lambda path: path.stem)
def test_every_shipped_grid_builds_valid_configs_at_both_ends_of_its_axes(path):
    """The first and the last point (every axis at its first, then its last value) load as VTAB-1k configs: each
    key is a config key and each method option exists and is in range. A grid whose method is still being written
    is skipped until the method is registered."""
    from visionpeft.config import load_config
    from visionpeft.registry import METHODS

    grid = read_grid(path)
    name = _method_name(grid)
    if name not in METHODS.names():
        pytest.skip(f"method '{name}' is not registered yet")
    points = expand(grid, path.stem)
    for point in (points[0], points[-1]):
        config = load_config(VTAB_CONFIG, list(point.overrides))
        assert config.method.name == name


def test_run_names_are_stable_and_change_with_any_input():
    name = run_hash("abc", ["optim.lr=0.1", "train.seed=0"], 0, "select")
    assert name == run_hash("abc", ("optim.lr=0.1", "train.seed=0"), 0, "select")
    assert name == "e10545517065"  # the same on every machine and Python version: a sweep resumes anywhere
    others = {
        run_hash("abd", ["optim.lr=0.1", "train.seed=0"], 0, "select"),
        run_hash("abc", ["optim.lr=0.2", "train.seed=0"], 0, "select"),
        run_hash("abc", ["optim.lr=0.1", "train.seed=0"], 1, "select"),
        run_hash("abc", ["optim.lr=0.1", "train.seed=0"], 0, "final"),
    }
    assert len(others) == 4 and name not in others
