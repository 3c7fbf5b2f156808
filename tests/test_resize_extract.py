"""vp.resize_lora (sd-scripts resize_lora.py: SVD to a rank, or sv_fro energy) and vp.extract_lora (sd-scripts
extract_lora_from_models.py: a LoRA of the difference of a fine-tuned model to its base): the truncated SVD and its
reported error, sd-scripts' rank rule, files that load (visionpeft, PEFT, kohya), bad input in one line."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _arithmetic_utils import lora_folder
from tiny_models import sample_images, tiny_sd_pipeline, tiny_unet, tiny_vit

import visionpeft as vp
from visionpeft.arithmetic.records import read_adapter
from visionpeft.arithmetic.resize import energy_rank
from visionpeft.errors import CheckpointError, ConfigError

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _product(tensors, prefix):
    return tensors[f"{prefix}.lora_B"].flatten(1) @ tensors[f"{prefix}.lora_A"].flatten(1)


def _tail_error(matrix, rank):
    s = torch.linalg.svdvals(matrix.double())
    return float(s[rank:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())


# -- resize ---------------------------------------------------------------------------------------------------------


def test_resize_to_a_rank_keeps_the_best_approximation_and_the_scale(tmp_path):
    model = lora_folder(tmp_path / "a", seed=1, r=4, alpha=8.0, target_modules=["qkv", "fc1", "fc2"])
    result = vp.resize_lora(tmp_path / "a", rank=2, output=tmp_path / "a2")
    options = result.config["methods"][0]["config"]
    assert (options["r"], options["alpha"]) == (2, 4.0)  # alpha / r stays 2, as sd-scripts' new_alpha = scale * rank
    for name, update in read_adapter(tmp_path / "a").groups[0].updates.items():
        product = update.product()
        assert result.layers[name].rank == 2
        assert result.layers[name].relative_error == pytest.approx(_tail_error(product, 2), rel=1e-4)
        approx = _product(result.tensors, name)
        assert float((product - approx).norm() / product.norm()) == pytest.approx(_tail_error(product, 2), rel=1e-4)
    torch.testing.assert_close(result.tensors["head.weight"], model.head.weight.detach())  # heads kept as they are
    resized = vp.load_adapter(tiny_vit(), tmp_path / "a2")
    full = vp.resize_lora(tmp_path / "a", rank=4)  # the full rank: the same adapter
    assert max(fit.relative_error for fit in full.layers.values()) < 1e-5
    with torch.no_grad():
        assert (resized(IMAGES) - model(IMAGES)).abs().max() > 1e-3


def _reference_sv_fro_rank(singular, target, rank):
    """sd-scripts networks/resize_lora.py (commit 48d368f), index_sv_fro (lines 68-75) and rank_resize (lines 155-181)
    for dynamic_method "sv_fro", written out here: the count of singular values whose squares reach target**2 of the
    sum, clipped to [1, len(S) - 1], plus one; rank 1 for a zero matrix; at most ``rank``."""
    squares = [float(s) ** 2 for s in singular]
    total, running, index = sum(squares), 0.0, len(squares)
    for i, square in enumerate(squares):
        running += square
        if running / total >= target**2:
            index = i
            break
    index = max(1, min(index + 1, len(squares) - 1))
    new_rank = index + 1
    if singular[0] <= 1e-6:
        return 1
    return min(new_rank, rank)


@pytest.mark.parametrize("energy", [0.3, 0.6, 0.9, 0.99, 1.0])
def test_energy_picks_sd_scripts_sv_fro_rank(energy):
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        singular = torch.sort(torch.rand(12, generator=generator) ** 3, descending=True).values
        expected = _reference_sv_fro_rank(singular.tolist(), energy**0.5, rank=8)
        assert energy_rank(singular, energy, cap=8) == expected
    assert energy_rank(torch.zeros(5), energy, cap=4) == 1


def test_resize_by_energy_pads_lower_ranks_and_reports_each(tmp_path):
    model = vp.attach(tiny_vit(), "lora", r=4, alpha=4.0, target_modules=["fc1", "fc2"], modules_to_save=[])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # fc1: singular values 8, 4, 2, 1; fc2: 1, 1e-3, 1e-3, 1e-3
        for block in model.blocks:
            for layer, values in ((block.mlp.fc1, [8.0, 4.0, 2.0, 1.0]), (block.mlp.fc2, [1.0, 1e-3, 1e-3, 1e-3])):
                u = torch.linalg.qr(torch.randn(layer.base.out_features, 4, generator=generator))[0]
                v = torch.linalg.qr(torch.randn(layer.base.in_features, 4, generator=generator))[0]
                layer.updates["main"].lora_B.copy_(u * torch.tensor(values))
                layer.updates["main"].lora_A.copy_(v.T)
    vp.save_adapter(model, tmp_path / "a")
    result = vp.resize_lora(tmp_path / "a", energy=0.9, output=tmp_path / "e")
    # fc1: 64 + 16 = 80 of 85 > 0.9 -> 2 values, + 1 (sd-scripts) = 3; fc2: 1 value, + 1 = 2
    assert {n: f.rank for n, f in result.layers.items()} == {
        "blocks.0.mlp.fc1": 3,
        "blocks.0.mlp.fc2": 2,
        "blocks.1.mlp.fc1": 3,
        "blocks.1.mlp.fc2": 2,
    }
    assert result.layers["blocks.0.mlp.fc1"].relative_error == pytest.approx((1 / 85) ** 0.5, rel=1e-4)
    assert result.config["methods"][0]["config"]["r"] == 3 and any("zero-padded" in n for n in result.notes)
    padded = result.tensors["blocks.0.mlp.fc2.lora_A"]
    assert padded.shape[0] == 3 and not padded[2].any()
    vp.load_adapter(tiny_vit(), tmp_path / "e")


def test_resize_keeps_dora_magnitudes_and_reads_loaded_models(tmp_path):
    model = lora_folder(tmp_path / "d", seed=2, r=4, use_dora=True, targets=["q", "v"])
    from_folder = vp.resize_lora(tmp_path / "d", rank=1)
    from_model = vp.resize_lora(model, rank=1)
    for name, tensor in from_folder.tensors.items():
        torch.testing.assert_close(from_model.tensors[name], tensor, rtol=0, atol=0)
    saved = read_adapter(tmp_path / "d").tensors
    for name in [k for k in saved if k.endswith("magnitude")]:
        assert torch.equal(from_folder.tensors[name], saved[name])
    from_folder.save(tmp_path / "d1")
    vp.load_adapter(tiny_vit(), tmp_path / "d1")


def test_resize_bad_input_is_one_line(tmp_path):
    lora_folder(tmp_path / "a", seed=1, r=4)
    hybrid = vp.attach(tiny_vit(), [("vpt", {"num_tokens": 2}), ("lora", {"r": 4})])
    vp.save_adapter(hybrid, tmp_path / "hybrid")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep")
    cases = [
        (ConfigError, "needs rank", dict()),
        (ConfigError, "lowers ranks", dict(rank=8)),
        (ConfigError, r"in \(0, 1\]", dict(energy=1.5)),
        (ConfigError, "holds files", dict(rank=2, output=tmp_path / "full")),
    ]
    for error, message, options in cases:
        with pytest.raises(error, match=message) as err:
            vp.resize_lora(tmp_path / "a", **options)
        assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="pass the model instead"):
        vp.resize_lora(tmp_path / "hybrid", rank=2)
    result = vp.resize_lora(hybrid, rank=2)  # the loaded model says which tensors are LoRA's; vpt's are kept
    assert [m["name"] for m in result.config["methods"]] == ["vpt", "lora"]
    assert (tmp_path / "full" / "x.txt").read_text() == "keep"


# -- extract --------------------------------------------------------------------------------------------------------


def _low_rank_tuned(base, rank=2, seed=0):
    """A copy of ``base`` whose qkv and fc1 weights moved by a rank-``rank`` matrix and whose head moved too."""
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in tuned.blocks:
            for layer in (block.attn.qkv, block.mlp.fc1):
                out, inp = layer.weight.shape
                layer.weight += torch.randn(out, rank, generator=generator) @ torch.randn(
                    rank, inp, generator=generator
                )
        tuned.head.weight += 0.5
    return tuned


def test_an_exactly_low_rank_difference_is_extracted_exactly(tmp_path):
    base, tuned = tiny_vit(), None
    tuned = _low_rank_tuned(base)
    result = vp.extract_lora(tuned, base, rank=2, output=tmp_path / "lora")
    assert set(result.layers) == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "mlp.fc1")}
    assert all(fit.rank == 2 and fit.relative_error < 1e-5 for fit in result.layers.values())
    assert not result.notes  # nothing else differs
    with torch.no_grad():
        torch.testing.assert_close(base(IMAGES), tuned(IMAGES), rtol=1e-4, atol=1e-5)  # base carries the LoRA
        loaded = vp.load_adapter(tiny_vit(), tmp_path / "lora")
        torch.testing.assert_close(loaded(IMAGES), tuned(IMAGES), rtol=1e-4, atol=1e-5)
    vp.detach(base)
    torch.testing.assert_close(base.head.weight, tiny_vit().head.weight, rtol=0, atol=0)  # restored exactly


def test_extract_at_a_lower_rank_reports_the_svd_tail_and_other_differences():
    base = tiny_vit()
    tuned = _low_rank_tuned(base, rank=3)
    with torch.no_grad():
        tuned.blocks[0].norm1.weight += 0.1
        tuned.blocks[1].mlp.fc2.weight += 1e-4
    result = vp.extract_lora(tuned, base, rank=1, min_diff=1e-3)
    for name, fit in result.layers.items():
        difference = (tuned.get_submodule(name).weight - tiny_vit().get_submodule(name).weight).detach()
        assert fit.rank == 1 and fit.relative_error == pytest.approx(_tail_error(difference, 1), rel=1e-4)
    assert any("blocks.0.norm1.weight" in note for note in result.notes)  # no LoRA holds a norm
    assert any("left out" in note and "blocks.1.mlp.fc2" in note for note in result.notes)


def test_extracted_peft_folder_loads_in_peft_with_the_tuned_outputs(tmp_path):
    from peft import PeftModel

    base = tiny_vit()
    tuned = _low_rank_tuned(base)
    vp.extract_lora(tuned, base, rank=2, output=tmp_path / "peft", format="peft")
    peft_model = PeftModel.from_pretrained(tiny_vit(), str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IMAGES), tuned(IMAGES), rtol=1e-4, atol=1e-5)


def test_unet_convolutions_take_conv_rank_and_export_as_kohya(tmp_path):
    base = tiny_unet()
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if name.endswith(("conv1", "to_q")):
                module.weight += torch.randn(module.weight.shape, generator=generator) * 0.05
    result = vp.extract_lora(tuned, base, rank=3, conv_rank=2, output=tmp_path / "kohya", format="kohya")
    convs = [n for n in result.layers if n.endswith("conv1")]
    assert convs and all(result.layers[n].rank == 2 for n in convs)
    assert all(result.layers[n].rank == 3 for n in result.layers if n.endswith("to_q"))
    sample, timestep, text = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 16)
    imported = vp.load_adapter(tiny_unet(), tmp_path / "kohya" / "lora_kohya.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(
            imported(sample, timestep, text).sample, base(sample, timestep, text).sample, rtol=1e-4, atol=1e-5
        )


def test_extract_bad_input_is_one_line_and_leaves_base_as_it_was(tmp_path):
    base = tiny_vit()
    tuned = _low_rank_tuned(base)
    cases = [
        (ConfigError, "different architectures", lambda: vp.extract_lora(tiny_vit(depth=3), base, rank=2)),
        (ConfigError, "nothing to extract", lambda: vp.extract_lora(tiny_vit(), base, rank=2)),
        (ConfigError, "positive integer", lambda: vp.extract_lora(tuned, base, rank=0)),
        (ConfigError, "unknown format", lambda: vp.extract_lora(tuned, base, rank=2, format="ckpt")),
        (ConfigError, "selects no", lambda: vp.extract_lora(tuned, base, rank=2, target_modules=["nothing"])),
        (
            CheckpointError,
            "kohya LoRA format is for a Stable Diffusion",
            lambda: vp.extract_lora(tuned, base, rank=2, output=tmp_path / "k", format="kohya"),
        ),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message) as err:
            call()
        assert "\n" not in str(err.value)
        assert not vp.attached_methods(base) and not (tmp_path / "k").exists()
    vp.attach(base, "lora")
    with pytest.raises(ConfigError, match="plain base model"):
        vp.extract_lora(tuned, base, rank=2)


@pytest.mark.slow  # three tiny pipelines and two samplings: ~20 s on 2 cores
def test_a_pipeline_gets_one_lora_per_tower_that_imports_back_from_kohya(tmp_path):
    base, tuned = tiny_sd_pipeline(tmp_path / "tok"), tiny_sd_pipeline(tmp_path / "tok")
    layers = [(tuned.unet, "attn1.to_q"), (tuned.text_encoder, "layers.0.self_attn.q_proj")]
    with torch.no_grad():
        for component, suffix in layers:
            next(m for n, m in component.named_modules() if n.endswith(suffix)).weight.add_(0.2)
    result = vp.extract_lora(tuned, base, rank=2, output=tmp_path / "kohya", format="kohya")
    assert [m["config"]["tower"] for m in result.config["methods"]] == ["unet", "text_encoder"]
    result.save(tmp_path / "folder")
    described = "\n".join(vp.describe_adapter(tmp_path / "folder"))  # each tower's layers under its own lora
    layer_lines = [line.strip() for line in described.splitlines() if line.strip().startswith("layers: ")]
    assert [line.split()[1].split(".")[0] for line in layer_lines] == ["unet", "text_encoder"]
    imported = vp.load_adapter(tiny_sd_pipeline(tmp_path / "tok"), tmp_path / "kohya" / "lora_kohya.safetensors")
    np.testing.assert_allclose(sample_images(imported, "a cat"), sample_images(tuned, "a cat"), atol=1e-4)
