"""vp.combine_adapters: every combination type equals PEFT's add_weighted_adapter on the adapters' PEFT files (DARE's
masks too, under the seed rule), on Linear and Conv2d layers; folders and loaded models give one result; the result
loads and exports like any LoRA; bad input is one line and writes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from _arithmetic_utils import WHOLE_LAYERS, lora_folder, peft_combination, randomize_lora
from tiny_models import tiny_unet, tiny_vit

import visionpeft as vp
from visionpeft.arithmetic.combine import COMBINATIONS
from visionpeft.arithmetic.records import read_adapter
from visionpeft.errors import CheckpointError, ConfigError

#: type -> options; the factor-wise types need one rank, the others take a third adapter of another rank and alpha
CASES = {
    "linear": {},
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.6},
    "dare_ties": {"density": 0.6, "majority_sign_method": "frequency"},
    "magnitude_prune": {"density": 0.4},
    "cat": {},
    "svd": {"svd_rank": 3},
    "ties_svd": {"density": 0.5, "svd_rank": 3},
    "dare_linear_svd": {"density": 0.7, "svd_rank": 2},
    "dare_ties_svd": {"density": 0.5, "svd_rank": 2},
    "magnitude_prune_svd": {"density": 0.5, "svd_rank": 2, "svd_clamp": 0.9},
}
WEIGHTS = [0.7, -0.4, 1.3]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    lora_folder(root / "a", seed=1, r=4, alpha=8.0, **WHOLE_LAYERS)
    lora_folder(root / "b", seed=2, r=4, alpha=2.0, **WHOLE_LAYERS)  # another scale: B is combined with it folded in
    lora_folder(root / "c", seed=3, r=2, alpha=6.0, **WHOLE_LAYERS)  # another rank (cat, *svd only)
    return root


def _assert_equal_to_peft(result, reference):
    assert {f"{path}.lora_A" for path in reference} == {k for k in result.tensors if k.endswith("lora_A")}
    for path, (a, b, scaling) in reference.items():
        assert scaling == 1.0  # PEFT's combined adapter: lora_alpha = r, as visionpeft's (alpha = r in the config)
        torch.testing.assert_close(result.tensors[f"{path}.lora_A"], a, rtol=0, atol=1e-6, msg=path)
        torch.testing.assert_close(result.tensors[f"{path}.lora_B"], b, rtol=0, atol=1e-6, msg=path)


def test_the_types_are_peft_s():
    assert set(CASES) == set(COMBINATIONS)


@pytest.mark.parametrize("combination_type", CASES)
def test_every_type_equals_peft_add_weighted_adapter(folders, combination_type):
    options = CASES[combination_type]
    factor_wise = COMBINATIONS[combination_type][1] == "factors"
    paths = [folders / n for n in ("ab" if factor_wise else "abc")]
    weights = WEIGHTS[: len(paths)]
    reference = peft_combination(paths, weights, combination_type, seed=5, **options)
    result = vp.combine_adapters(paths, weights, combination_type, seed=5, **options)
    _assert_equal_to_peft(result, reference)
    rank = {"cat": 10}.get(combination_type, options.get("svd_rank", 4))
    assert result.config["methods"] == [
        {"name": "lora", "config": {**read_adapter(paths[0]).config["methods"][0]["config"], "r": rank, "alpha": rank}}
    ]
    assert bool(result.layers) == combination_type.endswith("svd")  # the truncation error of each layer


UNET_LAYERS = ["conv1", "conv2", "to_q", "conv_shortcut"]
#: diffusers' U-Net registers up_blocks before mid_block: DARE's masks are PEFT's where module order is name order
DOWN_BLOCKS = r"down_blocks\..*\.(conv1|conv2|to_q|conv_shortcut)"


@pytest.mark.parametrize("combination_type", ["cat", "svd", "ties", "dare_linear_svd"])
def test_convolutions_equal_peft(tmp_path, combination_type):
    paths = [tmp_path / "a", tmp_path / "b"]
    layers = {"target_modules": DOWN_BLOCKS if "dare" in combination_type else UNET_LAYERS, "modules_to_save": []}
    lora_folder(paths[0], seed=1, r=2, alpha=4.0, factory=tiny_unet, **layers)
    lora_folder(paths[1], seed=2, r=2, alpha=2.0, factory=tiny_unet, **layers)
    options = {k: v for k, v in CASES[combination_type].items() if k != "svd_rank"}
    options.update({"svd_rank": 3} if combination_type.endswith("svd") else {})
    reference = peft_combination(paths, [0.6, 0.9], combination_type, seed=3, factory=tiny_unet, **options)
    assert any(a.dim() == 4 and a.shape[-1] == 3 for a, _, _ in reference.values())  # 3x3 convolutions among them
    result = vp.combine_adapters(paths, [0.6, 0.9], combination_type, seed=3, **options)
    # PEFT forms a 3x3 conv's delta W by convolving B with A; the matrix product here rounds a little differently
    for path, (a, b, _) in reference.items():
        delta = b.flatten(1) @ a.flatten(1)
        ours = result.tensors[f"{path}.lora_B"].flatten(1) @ result.tensors[f"{path}.lora_A"].flatten(1)
        torch.testing.assert_close(ours, delta, rtol=1e-4, atol=1e-5, msg=path)


def test_folders_and_models_give_one_result_and_the_seed_decides(folders):
    models = [vp.load_adapter(tiny_vit(), folders / n) for n in "ab"]
    from_folders = vp.combine_adapters([folders / "a", folders / "b"], [1.0, 0.5], "dare_ties", density=0.5, seed=7)
    from_models = vp.combine_adapters(models, [1.0, 0.5], "dare_ties", density=0.5, seed=7)
    other_seed = vp.combine_adapters(models, [1.0, 0.5], "dare_ties", density=0.5, seed=8)
    state = torch.random.get_rng_state()
    again = vp.combine_adapters(models, [1.0, 0.5], "dare_ties", density=0.5, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left as it was
    key = "blocks.0.attn.qkv.lora_A"
    for result in (from_models, again):
        for name, tensor in from_folders.tensors.items():
            torch.testing.assert_close(result.tensors[name], tensor, rtol=0, atol=0)
    assert not torch.equal(other_seed.tensors[key], from_folders.tensors[key])


def _product(tensors, prefix):
    return tensors[f"{prefix}.lora_B"].flatten(1) @ tensors[f"{prefix}.lora_A"].flatten(1)


def test_cat_is_the_weighted_sum_and_the_result_loads_and_exports(tmp_path):
    layers = {"target_modules": ["to_q", "to_v", "conv1"], "modules_to_save": []}
    for seed, (name, alpha) in enumerate([("a", 4.0), ("b", 1.0)]):
        lora_folder(tmp_path / name, seed=seed, r=2, alpha=alpha, factory=tiny_unet, **layers)
    result = vp.combine_adapters([tmp_path / "a", tmp_path / "b"], [0.5, -2.0], "cat", tmp_path / "ab")
    assert result.output == tmp_path / "ab"
    records = [read_adapter(tmp_path / n) for n in "ab"]
    for name in records[0].groups[0].updates:
        expected = sum(
            w * r.groups[0].updates[name].product() * r.groups[0].scale for w, r in zip([0.5, -2.0], records)
        )
        torch.testing.assert_close(_product(result.tensors, name), expected, rtol=1e-5, atol=1e-6)
    # the folder is an ordinary LoRA: it loads, and exports as kohya / PEFT files
    sample, timestep, text = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 16)
    combined = vp.load_adapter(tiny_unet(), tmp_path / "ab")
    reference = tiny_unet()  # each update folded into the weights by hand
    with torch.no_grad():
        for record, weight in zip(records, [0.5, -2.0]):
            for name, update in record.groups[0].updates.items():
                layer = reference.get_submodule(name)
                layer.weight += (weight * update.scale * update.product()).view_as(layer.weight)
        torch.testing.assert_close(
            combined(sample, timestep, text).sample, reference(sample, timestep, text).sample, rtol=1e-4, atol=1e-5
        )
    vp.save_adapter(combined, tmp_path / "kohya", format="kohya")
    vp.save_adapter(combined, tmp_path / "peft", format="peft")
    assert (tmp_path / "kohya" / "lora_kohya.safetensors").is_file()
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4


def test_a_single_adapter_is_combined_linearly_as_peft_does(folders):
    result = vp.combine_adapters([folders / "a"], [0.25], "svd", svd_rank=2)
    record = read_adapter(folders / "a")
    assert result.config["methods"][0]["config"]["r"] == 4  # linear keeps the rank; svd_rank is not used
    for name, update in record.groups[0].updates.items():
        expected = 0.25 * update.scale * update.product()
        torch.testing.assert_close(_product(result.tensors, name), expected, rtol=1e-5, atol=1e-6)


def test_layers_only_some_adapters_adapt_are_combined_from_those(tmp_path):
    lora_folder(tmp_path / "a", seed=1, r=2, alpha=2.0, targets=["q", "v"], modules_to_save=[])
    lora_folder(tmp_path / "b", seed=2, r=2, alpha=2.0, targets=["v", "fc1"], modules_to_save=[])
    result = vp.combine_adapters([tmp_path / "a", tmp_path / "b"], [0.5, 2.0], "linear", tmp_path / "ab")
    assert result.config["methods"][0]["config"]["targets"] == ["q", "v", "fc1"]
    b = read_adapter(tmp_path / "b").groups[0].updates["blocks.1.mlp.fc1"]
    torch.testing.assert_close(_product(result.tensors, "blocks.1.mlp.fc1"), 2.0 * b.product(), rtol=1e-5, atol=1e-6)
    vp.load_adapter(tiny_vit(), tmp_path / "ab")  # every layer of the union is there


def test_heads_are_kept_from_one_adapter(tmp_path):
    models = [lora_folder(tmp_path / n, seed=i, r=2) for i, n in enumerate("ab")]
    with torch.no_grad():
        models[1].head.weight.add_(1.0)
        vp.save_adapter(models[1], tmp_path / "b")
    paths = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(ConfigError, match="both carry task heads") as err:
        vp.combine_adapters(paths, [1, 1], "cat", tmp_path / "out")
    assert "heads_from" in str(err.value) and not (tmp_path / "out").exists()
    result = vp.combine_adapters(paths, [1, 1], "cat", heads_from=1)
    torch.testing.assert_close(result.tensors["head.weight"], models[1].head.weight.detach())


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text and text
    return text


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, folders):
    ab = [folders / "a", folders / "b"]
    out = tmp_path / "out"
    cases = [
        (ConfigError, "needs svd_rank", lambda: vp.combine_adapters(ab, [1, 1], "svd", out)),
        (ConfigError, "needs density", lambda: vp.combine_adapters(ab, [1, 1], "ties", out)),
        (ConfigError, r"in \(0, 1\]", lambda: vp.combine_adapters(ab, [1, 1], "dare_linear", out, density=1.5)),
        (ConfigError, "one weight per adapter", lambda: vp.combine_adapters(ab, [1], "cat", out)),
        (ConfigError, "did you mean 'ties'", lambda: vp.combine_adapters(ab, [1, 1], "tie", out)),
        (
            ConfigError,
            "needs one rank",
            lambda: vp.combine_adapters([folders / "a", folders / "c"], [1, 1], "linear", out),
        ),
        (
            ConfigError,
            "majority_sign_method",
            lambda: vp.combine_adapters(ab, [1, 1], "ties", out, density=0.5, majority_sign_method="x"),
        ),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message) as err:
            call()
        _one_line(err)
        assert not out.exists()


def test_adapters_that_cannot_be_combined_are_one_line(tmp_path, folders):
    out = tmp_path / "out"
    lora_folder(tmp_path / "deeper", seed=1, factory=lambda: tiny_vit(depth=3), **WHOLE_LAYERS)
    lora_folder(tmp_path / "other_weights", seed=1, factory=lambda: tiny_vit(seed=1), **WHOLE_LAYERS)
    lora_folder(tmp_path / "dora", seed=1, use_dora=True, **WHOLE_LAYERS)
    hybrid = vp.attach(
        tiny_vit(), [("vpt", {"num_tokens": 2}), ("lora", {"r": 4, "target_modules": ["qkv"]})], modules_to_save=[]
    )
    lora_folder(tmp_path / "targets", seed=1, targets=["q", "v"], modules_to_save=[])
    a = folders / "a"
    cases = [
        (CheckpointError, "adapt different bases", [a, tmp_path / "deeper"]),
        (CheckpointError, "different base weights", [a, tmp_path / "other_weights"]),
        (ConfigError, "is a DoRA adapter", [a, tmp_path / "dora"]),
        (ConfigError, "holds vpt", [hybrid, a]),
        (ConfigError, "chosen the same way", [a, tmp_path / "targets"]),
    ]
    for error, message, adapters in cases:
        with pytest.raises(error, match=message) as err:
            vp.combine_adapters(adapters, [1, 1], "cat", out)
        _one_line(err)
        assert not out.exists()
    vp.combine_adapters([a, tmp_path / "other_weights"], [1, 1], "cat", out, check_base=False)
    assert out.is_dir()


def test_an_output_holding_files_or_an_input_is_refused(tmp_path, folders):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds files") as err:
        vp.combine_adapters([folders / "a", folders / "b"], [1, 1], "cat", out)
    _one_line(err)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(ConfigError, match="is an input"):
        vp.combine_adapters([folders / "a", tmp_path / "empty"], [1, 1], "cat", tmp_path / "empty")


def test_loaded_lora_factors_are_not_changed_by_combining(folders):
    model = vp.load_adapter(tiny_vit(), folders / "a")
    before = {n: p.detach().clone() for n, p in vp.trainable_parameters(model)}
    vp.combine_adapters([model, folders / "b"], [0.5, 0.5], "ties", density=0.5)
    for name, parameter in vp.trainable_parameters(model):
        assert torch.equal(parameter, before[name])
    randomize_lora(model, seed=9)  # still an ordinary adapted model


def test_dare_masks_follow_peft_s_law_where_module_order_is_another(tmp_path):
    """On the whole U-Net (module order is not name order) DARE's masks are not PEFT's draws, but their law is: with
    the second adapter weighted 0, A = mask * A_1 / density, each value kept with probability density; and with
    density 1 nothing is dropped and the result is PEFT's."""
    paths = [tmp_path / "a", tmp_path / "b"]
    layers = {"target_modules": UNET_LAYERS, "modules_to_save": []}
    lora_folder(paths[0], seed=1, r=2, alpha=2.0, factory=tiny_unet, **layers)
    lora_folder(paths[1], seed=2, r=2, alpha=2.0, factory=tiny_unet, **layers)
    reference = peft_combination(paths, [1.0, 0.5], "dare_linear", factory=tiny_unet, density=1.0)
    _assert_equal_to_peft(vp.combine_adapters(paths, [1.0, 0.5], "dare_linear", density=1.0), reference)
    result = vp.combine_adapters(paths, [1.0, 0.0], "dare_linear", density=0.3, seed=11)
    first = read_adapter(paths[0]).groups[0].updates
    kept = total = 0
    for name, update in first.items():
        a = result.tensors[f"{name}.lora_A"]
        nonzero = a != 0
        torch.testing.assert_close(a[nonzero], update.a[nonzero] / 0.3, rtol=1e-6, atol=0)
        kept, total = kept + int(nonzero.sum()), total + a.numel()
    sigma = (0.3 * 0.7 / total) ** 0.5
    assert abs(kept / total - 0.3) < 4 * sigma, (kept, total)
