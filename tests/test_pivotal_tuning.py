"""Pivotal tuning (issue 30): textual inversion + LoRA in one run, the embeddings stopped after a share of the steps
(``optim.train_fraction``, diffusers' ``--train_text_encoder_ti_frac``); the run's files load through diffusers
(``load_lora_weights`` + ``load_textual_inversion``) with visionpeft's outputs, and the kohya file the run writes
(``train.export=[kohya]``) carries the embeddings bundled as A1111 reads them and loads through diffusers' and
lycoris-lora's kohya readers with the same outputs."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import train as tool  # noqa: E402
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_models import sample_images, tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_vit

import visionpeft as vp
from visionpeft.backbones.diffusers_loading import load_pipeline
from visionpeft.cli.common import run  # noqa: E402
from visionpeft.config.sections import OptimConfig
from visionpeft.errors import CheckpointError, ConfigError
from visionpeft.trainers.loop import build_scheduler
from visionpeft.trainers.run import build_optimizer


def optim_section(**options):
    return OmegaConf.merge(OmegaConf.structured(OptimConfig), options)


def test_train_fraction_stops_a_method_after_its_share_of_the_steps():
    """VPT's prompts change for int(0.5 x 7) = 3 steps and then never (lr 0, its weight decay too); LoRA changes at
    every step; the groups' lrs follow the schedule before the stop."""
    model = vp.attach(tiny_vit(), [("vpt", {"num_tokens": 2}), ("lora", {"r": 2})])
    optim = optim_section(lr=1e-2, weight_decay=0.1, bias_decay=True, train_fraction={"vpt": 0.5})
    optimizer = build_optimizer(optim, model, 1)
    cfg = types.SimpleNamespace(schedule="cosine", min_lr_ratio=0.0, power=1.0)
    scheduler = build_scheduler(cfg, optimizer, total_steps=7, warmup_steps=0, processes=1)
    vpt = [p for m in vp.adapter.require_state(model).methods if m.name == "vpt" for p in m.parameters()]
    lora = [p for m in vp.adapter.require_state(model).methods if m.name == "lora" for p in m.parameters()]
    stopped = [g for g in optimizer.param_groups if "train_until" in g]
    assert [p for g in stopped for p in g["params"]] == vpt and all(g["train_until"] == 0.5 for g in stopped)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    changed, rates = [], []
    for _ in range(7):
        rates.append((stopped[0]["lr"], optimizer.param_groups[0]["lr"]))
        before = [p.detach().clone() for p in vpt + lora]
        model(images).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        after = vpt + lora
        changed.append(
            (
                any(not torch.equal(b, a) for b, a in zip(before[: len(vpt)], after[: len(vpt)])),
                any(not torch.equal(b, a) for b, a in zip(before[len(vpt) :], after[len(vpt) :])),
            )
        )
    assert changed == [(True, True)] * 3 + [(False, True)] * 4
    assert all(mine == theirs > 0 for mine, theirs in rates[:3]) and rates[2][1] < rates[0][1]  # cosine
    assert all(mine == 0.0 < theirs for mine, theirs in rates[3:])


def test_train_fraction_off_leaves_the_groups_as_they_were():
    model = vp.attach(tiny_vit(), [("vpt", {"num_tokens": 2}), ("lora", {"r": 2})])
    plain = build_optimizer(optim_section(lr=1e-2), model, 1)
    assert not any("train_until" in g for g in plain.param_groups)


def test_train_fraction_bad_input_is_one_line():
    from visionpeft.config import load_config

    with pytest.raises(ConfigError, match=r"^optim.train_fraction.vpt must lie in \(0, 1\], got 1.5$"):
        load_config(None, ["optim.train_fraction={vpt: 1.5}"])
    model = vp.attach(tiny_vit(), "lora", r=2)
    with pytest.raises(ConfigError, match=r"^optim.train_fraction names vpt, which this run does not attach"):
        build_optimizer(optim_section(train_fraction={"vpt": 0.5}), model, 1)


def a1111_bundle(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The embeddings A1111 takes from a LoRA file: its rule in ``extensions-builtin/Lora/networks.py``
    (``load_network``: a key ``bundle_emb.<name>.<rest>``; ``string_to_param.<k>`` goes to the embedding's
    ``string_to_param`` dict, any other ``<rest>`` is a tensor of the embedding), written here from that rule."""
    bundles: dict[str, dict] = {}
    for key, tensor in state.items():
        head, _, rest = key.partition(".")
        if head != "bundle_emb":
            continue
        name, vector = rest.split(".", 1)
        entry = bundles.setdefault(name, {})
        if vector.split(".")[0] == "string_to_param":
            entry["string_to_param"] = {vector.split(".", 1)[1]: tensor}
        else:
            entry[vector] = tensor
    return bundles


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pivotal-tuning run of the tiny recipe on a tiny SD pipeline (24 steps, the embeddings for 12)."""
    tmp = tmp_path_factory.mktemp("pivotal")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    rng = np.random.default_rng(0)
    (tmp / "images").mkdir()
    for i in range(3):
        array = rng.integers(0, 80, (24, 24, 3), dtype=np.uint8)
        array[6:18, 6:18, 0] = 230
        Image.fromarray(array).save(tmp / "images" / f"{i}.png")
    args = [
        "configs/personalize/pivotal_tuning_tiny_sd.yaml",
        f"model.name={tmp / 'pipe'}",
        f"data.images={tmp / 'images'}",
        "data.size=16",
        "data.repeats=4",
        "data.batch_size=2",
        "optim.steps=24",
        "optim.lr=0.01",
        "optim.text_encoder_lr=0.05",
        "train.cache_latents=false",
        "train.eval_every=24",
        "train.validation_steps=2",
        "train.validation_images=1",
        f"train.output_dir={tmp / 'runs'}",
        "train.run_name=pivotal",
        "train.export=[kohya]",
        "--cpu",
    ]
    assert run(tool.main, args) == 0
    return tmp, tmp / "runs" / "pivotal"


@pytest.mark.slow
def test_pivotal_run_loads_in_diffusers_with_the_same_outputs(trained):
    tmp, run_dir = trained
    files = sorted(p.name for p in (run_dir / "diffusers").iterdir())
    assert files == ["learned_embeds.safetensors", "pytorch_lora_weights.safetensors"]
    ours = vp.load_adapter(load_pipeline(str(tmp / "pipe")), run_dir / "adapter")
    theirs = load_pipeline(str(tmp / "pipe"))
    theirs.load_lora_weights(str(run_dir / "diffusers"))
    theirs.load_textual_inversion(str(run_dir / "diffusers" / "learned_embeds.safetensors"))
    prompt = "a handwritten digit <new-digit>"
    base = sample_images(load_pipeline(str(tmp / "pipe")), prompt)
    drawn = sample_images(ours, prompt)
    assert abs(drawn - sample_images(theirs, prompt)).max() <= 1e-5
    assert abs(drawn - base).max() > 1e-3  # the run changed something
    embeds = load_file(run_dir / "diffusers" / "learned_embeds.safetensors")["<new-digit>"]
    start = theirs.text_encoder.get_input_embeddings().weight[theirs.tokenizer.encode("digit")[1]]
    assert not torch.allclose(embeds[0], start)  # the embedding trained (it starts as "digit", the initializer)


@pytest.mark.slow
def test_pivotal_run_writes_the_kohya_file_with_the_embeddings_as_a1111_reads_them(trained, tmp_path):
    """The run's kohya/lora_kohya.safetensors is save_adapter's kohya file of the run's adapter, listed in the run
    card; diffusers' kohya reader (its LoRA keys) plus the bundled embeddings draw what visionpeft draws."""
    tmp, run_dir = trained
    written = run_dir / "kohya" / "lora_kohya.safetensors"
    pipe = vp.load_adapter(load_pipeline(str(tmp / "pipe")), run_dir / "adapter")
    vp.save_adapter(pipe, tmp_path / "kohya", format="kohya")
    state = load_file(written)
    again = load_file(tmp_path / "kohya" / "lora_kohya.safetensors")
    assert sorted(state) == sorted(again) and all(torch.equal(state[k], again[k]) for k in state)
    card = (run_dir / "README.md").read_text()
    assert "- `kohya/lora_kohya.safetensors`: A1111, ComfyUI, sd-scripts, lycoris-lora" in card
    assert "- `adapter/`: visionpeft" in card and "- `diffusers/`: diffusers" in card
    embeds = load_file(run_dir / "diffusers" / "learned_embeds.safetensors")["<new-digit>"]
    bundle = a1111_bundle(state)
    assert list(bundle) == ["<new-digit>"] and list(bundle["<new-digit>"]["string_to_param"]) == ["*"]
    assert torch.equal(bundle["<new-digit>"]["string_to_param"]["*"], embeds)
    lora_keys = {k for k in state if not k.startswith("bundle_emb.")}
    assert lora_keys and all(k.startswith("lora_unet_") for k in lora_keys)
    theirs = load_pipeline(str(tmp / "pipe"))
    theirs.load_lora_weights({k: state[k] for k in lora_keys})
    theirs.load_textual_inversion({"<new-digit>": bundle["<new-digit>"]["string_to_param"]["*"]})
    prompt = "a handwritten digit <new-digit>"
    assert abs(sample_images(pipe, prompt) - sample_images(theirs, prompt)).max() <= 1e-5


@pytest.mark.slow
def test_pivotal_runs_kohya_file_loads_in_lycoris_with_the_same_unet(trained, tmp_path):
    """lycoris-lora's kohya loader on the run's file without the bundle keys (A1111 takes those apart first) finds
    every LoRA module and gives the U-Net visionpeft's adapter gives."""
    pytest.importorskip("lycoris.kohya")
    from lycoris_loading import apply_lycoris_file, sd_preset
    from tiny_models import _run_unet

    tmp, run_dir = trained
    state = load_file(run_dir / "kohya" / "lora_kohya.safetensors")
    lora = {k: v for k, v in state.items() if not k.startswith("bundle_emb.")}
    save_file(lora, tmp_path / "lora.safetensors")
    ours = vp.load_adapter(load_pipeline(str(tmp / "pipe")), run_dir / "adapter")
    fresh = load_pipeline(str(tmp / "pipe"))
    with sd_preset():
        network = apply_lycoris_file(fresh, tmp_path / "lora.safetensors")
    assert len(network.unet_loras) == len({k.split(".")[0] for k in lora}) and not network.text_encoder_loras
    with torch.no_grad():
        torch.testing.assert_close(_run_unet(fresh.unet), _run_unet(ours.unet), rtol=1e-5, atol=1e-5)
        base = _run_unet(load_pipeline(str(tmp / "pipe")).unet)
        assert (base - _run_unet(ours.unet)).abs().max() > 1e-4  # the LoRA changes the U-Net


def test_sdxl_bundle_keys_and_a_dotted_token_is_one_line(tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path / "tok")
    vp.attach(pipe, [("textual_inversion", {"token": "<s0>", "num_vectors": 2}), ("lora", {"r": 2, "targets": ["q"]})])
    vp.save_adapter(pipe, tmp_path / "kohya", format="kohya")
    bundle = a1111_bundle(load_file(tmp_path / "kohya" / "lora_kohya.safetensors"))
    assert {name: sorted(entry) for name, entry in bundle.items()} == {"<s0>": ["clip_g", "clip_l"]}
    assert bundle["<s0>"]["clip_l"].shape[0] == bundle["<s0>"]["clip_g"].shape[0] == 2
    dotted = vp.attach(tiny_sd_pipeline(tmp_path / "tok1"), "textual_inversion", token="<v.1>")
    with pytest.raises(CheckpointError, match="holds a dot, which A1111 reads as a key separator"):
        vp.save_adapter(dotted, tmp_path / "dotted", format="kohya")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "[safetensors]",
            "train.export names 'safetensors'; it takes kohya (adapter/ and diffusers/ are always written)",
        ),
        (
            "[kohyaa]",
            "train.export names 'kohyaa'; it takes kohya (adapter/ and diffusers/ are always written) "
            "(did you mean 'kohya'?)",
        ),
        ("[kohya,kohya]", "train.export names kohya twice"),
    ],
)
def test_export_names_are_checked_when_the_config_loads(value, expected):
    from visionpeft.config import load_config
    from visionpeft.config.personalization import EXPORT_FORMATS
    from visionpeft.trainers.run_exports import EXPORTS

    assert tuple(EXPORTS) == EXPORT_FORMATS
    with pytest.raises(ConfigError) as err:
        load_config("configs/personalize/pivotal_tuning_tiny_sd.yaml", ["data.images=.", f"train.export={value}"])
    assert str(err.value) == expected


def test_a_kohya_export_the_methods_cannot_make_is_refused_before_training(tmp_path, capsys):
    """A textual inversion token with a dot has no A1111 bundle key: one line, before any step (no metrics)."""
    tiny_sd_pipeline(tmp_path / "tok").save_pretrained(tmp_path / "pipe")
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / "0.png")
    args = [
        "configs/personalize/pivotal_tuning_tiny_sd.yaml",
        f"model.name={tmp_path / 'pipe'}",
        f"data.images={tmp_path / 'images'}",
        "data.size=16",
        "token=<v.1>",
        "train.export=[kohya]",
        f"train.output_dir={tmp_path / 'runs'}",
        "--cpu",
    ]
    assert run(tool.main, args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        "error: train.export names kohya, which this run cannot write: textual_inversion token '<v.1>' holds a dot, "
        "which A1111 reads as a key separator in a kohya bundle; use a token without dots, or format='diffusers'"
    )
    assert not list((tmp_path / "runs").rglob("metrics.jsonl"))
