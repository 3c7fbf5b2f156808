"""LyCORIS files (the kohya ``.safetensors`` layout of LoHa, LoKr, LoCon and OFT): ``save_adapter(...,
format="kohya")`` writes what lycoris-lora loads onto the same pipeline with our outputs, and ``load_adapter(pipe,
file)`` reads files lycoris-lora itself made with lycoris-lora's outputs; bad input in one line, the model left as it
was."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lycoris_loading import apply_lycoris_file, sd_preset
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import _run_unet, tiny_sd_pipeline, tiny_unet, tiny_vit

import visionpeft as vp
from visionpeft.adapter import methods_of
from visionpeft.checkpoint.exporters import KOHYA_NAME
from visionpeft.errors import CheckpointError

lycoris_kohya = pytest.importorskip("lycoris.kohya")

#: U-Net modules of every kind: attention and feed-forward Linears, 1 x 1 and 3 x 3 convolutions (LoCon-style), the
#: strided down-sampling conv, the time embedding.
UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "proj_in",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_embedding.linear_1",
]
TEXT_TARGETS = ["q_proj", "v_proj", "out_proj", "fc1"]


@pytest.fixture
def lycoris_network():
    """lycoris-lora's kohya network class with the SD preset, its class-level preset restored afterwards."""
    with sd_preset() as network:
        yield network


def _run_text(pipe):
    tokens = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.text_encoder(tokens)[0]


def _outputs(pipe):
    with torch.no_grad():
        return _run_unet(pipe.unet), _run_text(pipe)


def _randomize(parameters, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _assert_same(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def _adapted_pipeline(root, method, unet_options, text_options, unet_targets=UNET_TARGETS):
    pipe = tiny_sd_pipeline(root / "tok")
    vp.attach(
        pipe,
        [
            (method, {**unet_options, "target_modules": unet_targets}),
            (method, {**text_options, "tower": "text_encoder", "target_modules": TEXT_TARGETS}),
        ],
    )
    _randomize(p for _, p in vp.trainable_parameters(pipe))
    return pipe


def _lycoris_loaded(root, file):
    """A fresh pipeline with lycoris-lora's kohya loader applied from ``file``."""
    fresh = tiny_sd_pipeline(root / "tok")
    return fresh, apply_lycoris_file(fresh, file)


#: OFT as LyCORIS, kohya, A1111 and ComfyUI compute it: the output rows turned, the exact Cayley transform.
LYCORIS_OFT = {"oft_block_size": 4, "output_side": True, "use_cayley_neumann": False}
EXPORTS = {
    "oft_coft": ("oft", LYCORIS_OFT, {**LYCORIS_OFT, "coft": True, "eps": 0.05}),
    "oft_shared_block": ("oft", {**LYCORIS_OFT, "block_share": True}, {**LYCORIS_OFT, "oft_block_size": 2}),
    "loha": ("loha", {"r": 4, "alpha": 2.0}, {"r": 2, "alpha": 3.0}),
    "loha_cp_convs": ("loha", {"r": 2, "alpha": 1.0, "use_effective_conv2d": True}, {"r": 3, "alpha": 3.0}),
    "lokr": ("lokr", {"r": 1, "alpha": 2.0}, {"r": 1, "alpha": 3.0, "decompose_both": True}),
    "lokr_dense": ("lokr", {"r": 8, "alpha": 2.0}, {"r": 8, "alpha": 0.5}),
}


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "case",
    [
        "loha",
        "lokr",
        "oft_coft",
        *(pytest.param(c, marks=SLOW) for c in ("loha_cp_convs", "lokr_dense", "oft_shared_block")),
    ],
)
def test_lycoris_loads_the_kohya_export_with_our_outputs(case, tmp_path, lycoris_network):
    method, unet_options, text_options = EXPORTS[case]
    pipe = _adapted_pipeline(tmp_path, method, unet_options, text_options)
    ours = _outputs(pipe)
    vp.save_adapter(pipe, tmp_path / "out", format="kohya")
    file = tmp_path / "out" / KOHYA_NAME
    loaded, network = _lycoris_loaded(tmp_path, file)
    modules = {key.split(".")[0] for key in load_file(file)}
    assert len(network.unet_loras) + len(network.text_encoder_loras) == len(modules)
    assert len(network.text_encoder_loras) == 8  # q, v, out, fc1 of 2 layers: lycoris found every module
    base = _outputs(tiny_sd_pipeline(tmp_path / "tok"))
    assert min((o - b).abs().max() for o, b in zip(ours, base)) > 1e-3
    _assert_same(_outputs(loaded), ours)
    _assert_same(_outputs(vp.load_adapter(tiny_sd_pipeline(tmp_path / "tok"), file)), ours)  # and back


def test_kohya_export_keys_and_metadata(tmp_path):
    pipe = _adapted_pipeline(tmp_path, "loha", {"r": 4, "alpha": 2.0}, {"r": 2, "alpha": 3.0})
    vp.save_adapter(pipe, tmp_path / "out", format="kohya")
    with safe_open(tmp_path / "out" / KOHYA_NAME, "pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{q}.hada_w1_a", f"{q}.hada_w1_b", f"{q}.hada_w2_a", f"{q}.hada_w2_b", f"{q}.alpha"} <= keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_b" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a" in keys  # SD 1.x / 2.x: lora_te_
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "loha"}
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "2.0")  # the U-Net's 26 modules


def _a1111_lokr_delta(tensors, shape):
    """A1111's network_lokr.py / ComfyUI's weight_adapter/lokr.py reading of a LoKr module (test-side, from their
    calc_updown / calculate_weight): w1 (or w1_a @ w1_b), w2 (or w2_a @ w2_b), kron, times alpha / dim with dim the rows
    of w1_b or w2_b, 1 without one."""
    w1 = tensors.get("lokr_w1")
    w1 = w1 if w1 is not None else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    w2 = tensors.get("lokr_w2")
    w2 = w2 if w2 is not None else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
    dim = next((tensors[n].shape[0] for n in ("lokr_w2_b", "lokr_w1_b") if n in tensors), None)
    if len(shape) == 4:
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        w1 = w1[:, :, None, None]
    scale = float(tensors["alpha"]) / dim if dim else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


def test_lokr_convolutions_lycoris_misreads_are_read_by_a1111_and_comfyui_as_ours(tmp_path):
    # lycoris-lora's loader rebuilds a conv LoKr's Kronecker split from the flattened input size and fails on the
    # 4-channel conv_in / conv_out; A1111 and ComfyUI take the factors as they are
    pipe = _adapted_pipeline(tmp_path, "lokr", {"r": 1, "alpha": 2.0}, {"r": 1}, [*UNET_TARGETS, "conv_in", "conv_out"])
    vp.save_adapter(pipe, tmp_path / "out", format="kohya")
    tensors = load_file(tmp_path / "out" / KOHYA_NAME)
    for path in ("conv_in", "conv_out", "down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.proj_in"):
        wrapper = pipe.unet.get_submodule(path)
        module = {
            k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"lora_unet_{path.replace('.', '_')}.")
        }
        expected = wrapper.delta_weight()
        torch.testing.assert_close(_a1111_lokr_delta(module, expected.shape), expected, rtol=1e-5, atol=1e-6)


def test_locon_the_kohya_lora_export_loads_in_lycoris(tmp_path, lycoris_network):
    """LoCon is LoRA on convolutions: the existing kohya LoRA export (lora_down / lora_up, 3 x 3 downs) is lycoris'
    LoConModule; and a file mixing it with LoHa layers holds both and reads back."""
    pipe = tiny_sd_pipeline(tmp_path / "tok")
    vp.attach(
        pipe,
        [
            (
                "lora",
                {"r": 3, "alpha": 2.0, "target_modules": ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv"]},
            ),
            ("loha", {"r": 2, "target_modules": ["to_q", "to_v", "ff.net.0.proj"]}),
        ],
    )
    _randomize(p for _, p in vp.trainable_parameters(pipe))
    ours = _outputs(pipe)
    vp.save_adapter(pipe, tmp_path / "out", format="kohya")
    file = tmp_path / "out" / KOHYA_NAME
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in load_file(file)
    loaded, network = _lycoris_loaded(tmp_path, file)
    assert {type(m).__name__ for m in network.unet_loras} == {"LoConModule", "LohaModule"}
    _assert_same(_outputs(loaded), ours)
    back = vp.load_adapter(tiny_sd_pipeline(tmp_path / "tok"), file)
    assert sorted(name for name, _ in vp.attached_methods(back)) == ["loha", "lora"]
    _assert_same(_outputs(back), ours)


def test_kohya_export_refusals(tmp_path):
    refusals = [
        (
            "the kohya format is for a Stable Diffusion U-Net or pipeline",
            tiny_vit(),
            "loha",
            {"target_modules": ["qkv"]},
        ),
        ("the kohya format holds .*boft cannot be exported", tiny_unet(), "boft", {"target_modules": ["to_q"]}),
        (r"turns the input side \(PEFT's OFT\).*output_side=True", tiny_unet(), "oft", {"oft_block_size": 4}),
        ("uses the Cayley-Neumann series", tiny_unet(), "oft", {"oft_block_size": 4, "output_side": True}),
    ]
    for message, model, method, options in refusals:
        with pytest.raises(CheckpointError, match=message):
            vp.save_adapter(
                vp.attach(model, method, **{"target_modules": ["to_q"], **options}), tmp_path, format="kohya"
            )
    with pytest.raises(CheckpointError, match="output_side=True has no PEFT layout"):
        vp.save_adapter(vp.attach(tiny_unet(), "oft", target_modules=["to_q"], **LYCORIS_OFT), tmp_path, format="peft")
    assert list(tmp_path.iterdir()) == []


def test_output_side_oft_turns_the_output_rows_merges_and_detaches():
    model = vp.attach(tiny_unet(), "oft", target_modules=["to_q", "conv1"], **LYCORIS_OFT)
    _randomize(p for _, p in vp.trainable_parameters(model))
    for path in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1"):
        wrapper = model.get_submodule(path)
        base, turned = wrapper.base.weight.flatten(1), wrapper.effective_weight().flatten(1)
        assert (turned - base).abs().max() > 1e-3
        # an orthogonal turn of each block of 4 output rows keeps that block's column norms (an input-side turn keeps
        # each row's norm instead, which this one does not)
        blocks = lambda w: w.reshape(w.shape[0] // 4, 4, -1).norm(dim=1)  # noqa: E731
        torch.testing.assert_close(blocks(turned), blocks(base), rtol=1e-5, atol=1e-6)
        assert (turned.norm(dim=1) - base.norm(dim=1)).abs().max() > 1e-4
    expected = _run_unet(model)
    torch.testing.assert_close(_run_unet(vp.merge(copy.deepcopy(model))), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_run_unet(vp.detach(model)), _run_unet(tiny_unet()), rtol=0, atol=0)


#: lycoris-lora networks made on the tiny pipeline: (network_dim, network_alpha, keyword arguments). Linear and conv
#: modules get different ranks and alphas (conv_dim / conv_alpha), so one method holds several.
IMPORTS = {
    "loha": (4, 2.0, {"algo": "loha", "conv_dim": 2, "conv_alpha": 3.0}),
    "loha_cp": (3, 1.0, {"algo": "loha", "conv_dim": 2, "conv_alpha": 0.5, "use_tucker": True}),
    "lokr": (2, 4.0, {"algo": "lokr", "conv_dim": 1, "conv_alpha": 1.0, "decompose_both": True}),
    "lokr_factor_cp": (1, 1.0, {"algo": "lokr", "factor": 2, "use_tucker": True}),
    "lokr_full": (2, 1.0, {"algo": "lokr", "full_matrix": True}),
    "locon_cp": (4, 2.0, {"algo": "locon", "conv_dim": 3, "conv_alpha": 1.5, "use_tucker": True}),
    # alpha is OFT's constraint (Q scaled to norm 0.01 x out rows); conv blocks of 2 sit inside visionpeft's 4
    "oft": (4, 0.0, {"algo": "diag-oft", "conv_dim": 2, "constraint": 0.01}),
}


def _lycoris_file(root, case, dim, alpha, options):
    """A file lycoris-lora made: its kohya network on a tiny pipeline's U-Net and text encoder, random weights, saved
    with its own save_weights; with the outputs lycoris computes."""
    kwargs = dict(options)
    pipe = tiny_sd_pipeline(root / "tok")
    network = lycoris_kohya.LycorisNetworkKohya(
        pipe.text_encoder,
        pipe.unet,
        lora_dim=dim,
        alpha=alpha,
        conv_lora_dim=kwargs.pop("conv_dim", dim),
        conv_alpha=kwargs.pop("conv_alpha", alpha),
        network_module=kwargs.pop("algo"),
        **kwargs,
    )
    network.apply_to(pipe.text_encoder, pipe.unet, True, True)
    _randomize(network.parameters(), seed=1)
    file = root / f"{case}.safetensors"
    network.save_weights(str(file), torch.float32, {})
    return file, _outputs(pipe)


@pytest.mark.parametrize(
    "case",
    [
        "loha",
        "lokr",
        "locon_cp",
        "oft",
        *(pytest.param(c, marks=SLOW) for c in ("loha_cp", "lokr_factor_cp", "lokr_full")),
    ],
)
def test_load_adapter_reads_lycoris_files_with_lycoris_outputs(case, tmp_path, lycoris_network):
    file, expected = _lycoris_file(tmp_path, case, *IMPORTS[case])
    assert min((o - b).abs().max() for o, b in zip(expected, _outputs(tiny_sd_pipeline(tmp_path / "tok")))) > 1e-3
    pipe = vp.load_adapter(tiny_sd_pipeline(tmp_path / "tok"), file)
    method = {"locon": "lora", "diag-oft": "oft"}.get(IMPORTS[case][2]["algo"], IMPORTS[case][2]["algo"])
    assert [(name, cfg.tower) for name, cfg in vp.attached_methods(pipe)] == [
        (method, "text_encoder"),
        (method, "unet"),
    ]
    _assert_same(_outputs(pipe), expected)


def test_per_module_ranks_become_one_method_per_tower_padded_to_the_largest(tmp_path, lycoris_network):
    file, expected = _lycoris_file(tmp_path, "loha", *IMPORTS["loha"])
    pipe = vp.load_adapter(tiny_sd_pipeline(tmp_path / "tok"), file)
    unet = vp.attached_methods(pipe)[1][1]
    assert (unet.r, unet.alpha) == (4, 4.0)  # linear rank 4, conv rank 2 padded; alpha / rank folded in
    conv = dict(methods_of(pipe)[1].named_tensors())["unet.down_blocks.0.resnets.0.conv1.hada_w1_b"]
    assert conv.shape == (4, 16 * 9) and conv[2:].abs().max() == 0


def _refused(model, file, match):
    before = vp.attached_methods(model)
    with pytest.raises(CheckpointError, match=match):
        vp.load_adapter(model, file)
    assert vp.attached_methods(model) == before


def test_lycoris_import_refusals(tmp_path):
    unet_file = tmp_path / "loha.safetensors"
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    loha = {
        f"{q}.hada_w1_a": torch.randn(16, 2),
        f"{q}.hada_w1_b": torch.randn(2, 16),
        f"{q}.hada_w2_a": torch.randn(16, 2),
        f"{q}.hada_w2_b": torch.randn(2, 16),
        f"{q}.alpha": torch.tensor(1.0),
    }
    save_file(loha, unet_file)
    vp.load_adapter(tiny_unet(), unet_file)  # the good file loads

    def variant(name, tensors):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        return path

    missing = variant("missing", {k.replace("blocks_0_attn1", "blocks_7_attn1"): v for k, v in loha.items()})
    _refused(tiny_unet(), missing, "transformer_blocks_7_attn1_to_q names no module of this model's unet")
    text = variant("text", {k.replace(q, "lora_te_text_model_encoder_layers_0_mlp_fc1"): v for k, v in loha.items()})
    _refused(tiny_unet(), text, "holds text_encoder modules .*; this diffusers_unet model has no text_encoder")
    wrong = variant("wrong", {**loha, f"{q}.hada_w1_b": torch.randn(2, 12)})
    _refused(tiny_unet(), wrong, r"to_q \(loha, .*\(16, 16\)\): hada_w1_b is \(2, 12\), the layer needs \(2, 16\)")
    ia3 = variant("ia3", {f"{q}.weight": torch.zeros(16), f"{q}.on_input": torch.tensor(0)})
    _refused(tiny_unet(), ia3, r"is a LyCORIS \(IA\)\^3 module; visionpeft reads LoHa, LoKr, LoCon \(LoRA\) and OFT")
    boft = variant("boft", {f"{q}.oft_blocks": torch.zeros(2, 2, 4, 4), f"{q}.alpha": torch.tensor(0.0)})
    _refused(tiny_unet(), boft, "is a LyCORIS BOFT")
    rescaled = variant("rescaled", {f"{q}.oft_blocks": torch.zeros(4, 4, 4), f"{q}.rescale": torch.ones(16, 1)})
    _refused(tiny_unet(), rescaled, "is a LyCORIS rescaled OFT")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + bytes(64))
    _refused(tiny_unet(), corrupt, "is not a readable safetensors file")
    adapted = vp.attach(tiny_unet(), "loha", target_modules=["to_q"])
    _refused(adapted, unet_file, "cannot add the methods of .* already attached")


def test_a_lokr_split_visionpeft_cannot_make_is_refused(tmp_path, lycoris_network):
    # LyCORIS puts the smaller factor first even for a factor above the square root (factor 4 splits conv_in's 4
    # input channels 1 x 4); PEFT's factorization, which visionpeft's lokr uses, gives 4 x 1 there
    file, _ = _lycoris_file(tmp_path, "lokr_factor_4", 1, 1.0, {"algo": "lokr", "factor": 4})
    _refused(tiny_sd_pipeline(tmp_path / "tok"), file, "lora_unet_conv_in 4x4 / 1x4.* no one decompose_factor")


def test_ia3_has_no_kohya_format_since_lycoris_lora_reads_no_ia3_file():
    """The reason ``ia3`` stops at PEFT's format (see :mod:`visionpeft.methods.ia3`): lycoris-lora's own loader fails
    on a file of its IA3 layout, so no export could be checked against it; when it reads one, revisit."""
    from lycoris.modules import get_module, make_module

    from visionpeft.methods import METHODS

    name = "lora_unet_fc"
    kind, params = get_module({f"{name}.weight": torch.zeros(8), f"{name}.on_input": torch.tensor(0)}, name)
    assert kind.__name__ == "IA3Module"
    with pytest.raises(TypeError, match="make_module_from_state_dict"):
        make_module(kind, params, name, torch.nn.Linear(4, 8))
    assert "kohya" not in METHODS.get("ia3").export_formats
