"""SSF and FacT on open_clip's own vision tower, whose attention is an ``nn.MultiheadAttention`` (projections of kind
``mha``, changed in weight space): the counts and names of the same geometry in timm, identity at initialisation,
the official equations, exact merge into the plain model, save / load, and the one-line refusals.

The references are this test's own code. SSF: the official ``Attention.forward`` of dongzelian/SSF
``models/vision_transformer.py`` (commit e94e0e7, lines 196-213: ``ssf_ada`` on the qkv output, line 199, and on
the proj output, line 211; ``ssf_ada`` lines 388-395) in place of each attention, and ``ssf_ada`` on the outputs of
the other sites (patch embedding, pre-norms, fc1, fc2, final norm). FacT: the increments of OSU-MLB/PETL_Vision
``model/fact.py`` (commit 245d262, ``FacT.forward``, lines 57-116, dropout in eval mode), which are linear in the
input: evaluated on the identity they are each projection's delta W, added to a copy of the plain weights.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from tiny_models import perturb, tiny_clip, tiny_vit

import visionpeft as vp
from visionpeft.adapter import methods_of
from visionpeft.errors import IncompatibleMethodError
from visionpeft.methods.fact import FacTFactors

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
D, DEPTH, DIM = 32, 2, 4  # tiny_clip's vision tower and tiny_vit: width 32, 2 blocks, MLP 4 x 32; FacT rank 4
SSF = ("ssf", {})
FACT_TT = ("fact", {"dropout": 0.0, "dim": DIM})
FACT_TK = ("fact", {"variant": "tk", "dropout": 0.0, "dim": DIM, "scale": 0.5})
METHODS = pytest.mark.parametrize(("method", "options"), [SSF, FACT_TT, FACT_TK], ids=["ssf", "fact-tt", "fact-tk"])


def method_tensors(model):
    return {name: tensor.numel() for name, tensor in methods_of(model)[0].named_tensors()}


@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [
        (*SSF, DEPTH * 2 * (3 * D + D + 4 * D + D + 2 * D) + 2 * D + 2 * D),  # qkv, o, fc1, fc2, 2 norms; embed, norm
        (*FACT_TT, 2 * DIM * D + DEPTH * (4 * DIM * DIM + 2 * 4 * DIM * DIM)),  # U, V; q k v o, fc1, fc2 cores
        (*FACT_TK, 2 * DIM * D + DIM**3 + DIM * DEPTH * 12),  # U, V, C, P
    ],
    ids=["ssf", "fact-tt", "fact-tk"],
)
def test_counts_and_names_equal_those_of_the_same_timm_geometry(method, options, expected):
    clip, vit = vp.attach(tiny_clip(), method, **options), vp.attach(tiny_vit(), method, **options)
    assert method_tensors(clip) == method_tensors(vit)
    assert vp.count_parameters(clip)["by_group"][method] == vp.count_parameters(vit)["by_group"][method] == expected


@pytest.mark.parametrize(("method", "options"), [("ssf", {"init_std": 0.0}), FACT_TT, FACT_TK])
def test_unchanged_at_initialisation(method, options):
    """SSF's scale 1 and shift 0 (init_std 0; the official init draws them), FacT's zero V."""
    model = vp.attach(tiny_clip(), method, **options)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(IMAGES), tiny_clip().encode_image(IMAGES), rtol=0, atol=0)


def ssf_ada(x, params, site, channel_dim=-1):
    """Official ``ssf_ada`` (lines 388-395) with the parameters of ``site``."""
    scale, shift = params[f"{site}.ssf.scale"], params[f"{site}.ssf.shift"]
    if channel_dim == 1:
        scale, shift = scale[:, None, None], shift[:, None, None]
    return x * scale + shift


def official_ssf_attention(attn, params, site, x):
    """The official SSF ``Attention.forward`` (lines 196-213) on the attention's weights, x of (B, N, C)."""
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = ssf_ada(F.linear(x, attn.in_proj_weight, attn.in_proj_bias), params, f"{site}.qkv")
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    weights = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return ssf_ada(F.linear(out, attn.out_proj.weight, attn.out_proj.bias), params, f"{site}.o")


def ssf_reference(plain, params):
    """``plain`` with the official SSF sites: ``ssf_ada`` hooked after each site, each attention replaced."""
    model = copy.deepcopy(plain).eval()
    visual = model.visual

    def hook(site, channel_dim=-1):
        return lambda module, args, output: ssf_ada(output, params, site, channel_dim)

    visual.conv1.register_forward_hook(hook("embed", 1))
    visual.ln_post.register_forward_hook(hook("norm"))
    for i, blk in enumerate(visual.transformer.resblocks):
        blk.ln_1.register_forward_hook(hook(f"blocks.{i}.attn.norm"))
        blk.ln_2.register_forward_hook(hook(f"blocks.{i}.mlp.norm"))
        blk.mlp.c_fc.register_forward_hook(hook(f"blocks.{i}.mlp.fc1"))
        blk.mlp.c_proj.register_forward_hook(hook(f"blocks.{i}.mlp.fc2"))

        def attention(attn, x, *_, site=f"blocks.{i}.attn", **__):
            x = x if attn.batch_first else x.transpose(0, 1)
            out = official_ssf_attention(attn, params, site, x)
            return (out if attn.batch_first else out.transpose(0, 1)), None

        blk.attn.forward = types.MethodType(attention, blk.attn)
    return model


def fact_increment(factors: FacTFactors, variant, index, mode, x):
    """PETL_Vision ``FacT.forward`` (lines 57-116) for block ``index``'s projection ``mode`` (``attn_q`` ... ``attn_o``,
    ``mlp_1``, ``mlp_2``) on ``x`` (B, N, C_in), before the scale. Our names: ``FacTu`` is ``x @ u.T``, ``FacTv`` is
    ``h @ v.T``, a tt core Linear ``h @ W.T``; Tucker ``FacTc`` / ``FacTp`` are ``tucker_c`` / ``tucker_p``."""
    u, v, dim = factors.u, factors.v, factors.dim
    b, n, c = x.shape[0], x.shape[1], u.shape[1]

    def fact_u(h):
        return h @ u.t()

    def fact_v(h):
        return h @ v.t()

    if variant == "tt":
        cores = {key: factors.cores[f"{index}_{name}"] for key, name in zip(MODES, FACT_NAMES)}
        mix = {key: (lambda h, w=w: h @ w.t()) for key, w in cores.items()}
    else:
        start = index * 12
        attn = factors.tucker_c @ factors.tucker_p[:, start : start + 4]  # lines 84-86
        mlp = factors.tucker_c @ factors.tucker_p[:, start + 4 : start + 12]  # lines 99-103
        mix = {f"attn_{s}": (lambda h, j=j: h @ attn[:, :, j]) for j, s in enumerate("qkvo")}
        mix["mlp_1"] = lambda h: h @ mlp[:, :, :4].reshape(dim, dim * 4)
        mix["mlp_2"] = lambda h: h @ mlp[:, :, 4:].reshape(dim, dim * 4).t()
    if mode == "mlp_1":  # lines 71-73 / 104-106
        return fact_v(mix[mode](fact_u(x)).reshape(b, n, 4, dim)).reshape(b, n, 4 * c)
    if mode == "mlp_2":  # lines 75-78 / 108-116
        return fact_v(mix[mode](fact_u(x.reshape(b, n, 4, c)).reshape(b, n, 4 * dim)))
    return fact_v(mix[mode](fact_u(x)))  # lines 61-68 / 83-96


MODES = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_1", "mlp_2")
FACT_NAMES = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_fc1", "mlp_fc2")


def fact_reference(plain, factors, variant, scale):
    """``plain`` with ``W + scale * delta W`` in every adapted projection, delta W the increment of the identity."""
    model = copy.deepcopy(plain).eval()
    with torch.no_grad():
        for i, blk in enumerate(model.visual.transformer.resblocks):
            attn, mlp = blk.attn, blk.mlp
            weights = {f"attn_{s}": attn.in_proj_weight[j * D : (j + 1) * D] for j, s in enumerate("qkv")}
            weights |= {"attn_o": attn.out_proj.weight, "mlp_1": mlp.c_fc.weight, "mlp_2": mlp.c_proj.weight}
            for mode, weight in weights.items():
                identity = torch.eye(weight.shape[1])[None]  # the inputs e_1 ... e_C: the increments are delta W^T
                weight += fact_increment(factors, variant, i, mode, identity)[0].t() * scale
    return model


@METHODS
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
def test_forward_equals_the_official_equations(method, options, batch_first):
    plain = tiny_clip(batch_first=batch_first)
    model = perturb(vp.attach(copy.deepcopy(plain), method, **options))
    attached = methods_of(model)[0]
    if method == "ssf":
        reference = ssf_reference(plain, {name: t.detach() for name, t in attached.named_tensors()})
    else:
        reference = fact_reference(plain, attached.factors, attached.config.variant, attached.config.scale)
    with torch.no_grad():
        adapted = model.encode_image(IMAGES)
        assert (adapted - plain.encode_image(IMAGES)).abs().max() > 1e-2  # the parameters really act
        torch.testing.assert_close(adapted, reference.encode_image(IMAGES), rtol=1e-5, atol=1e-5)


@METHODS
def test_merge_equals_unmerged_and_leaves_the_plain_model(method, options):
    model = perturb(vp.attach(tiny_clip(), method, **options))
    plain = tiny_clip()
    assert plain.visual.conv1.bias is None  # ssf's shift after it folds into the position embedding's patch rows
    with torch.no_grad():
        before = model.encode_image(IMAGES)
        merged = vp.merge(model)
        torch.testing.assert_close(merged.encode_image(IMAGES), before, rtol=1e-5, atol=1e-5)
    assert not vp.attached_methods(merged)
    modules = [(name, type(m)) for name, m in merged.named_modules()]
    assert modules == [(name, type(m)) for name, m in plain.named_modules()]  # no wrapper, no added module
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in merged.modules())
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


@METHODS
def test_save_load_round_trip(method, options, tmp_path):
    model = perturb(vp.attach(tiny_clip(), method, **options))
    with torch.no_grad():
        trained = model.encode_image(IMAGES)
    vp.save_adapter(model, tmp_path)
    fresh = vp.load_adapter(tiny_clip(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_image(IMAGES), trained, rtol=0, atol=0)


def test_ssf_merges_with_difffit_hooking_the_same_attention():
    """DiffFit's gamma hooks the attention module itself; the weight-space forward runs that hook, and the merge
    folds the scale-shift first, then gamma (which multiplies the shift too)."""
    for methods in ([SSF, ("difffit", {})], [("difffit", {}), SSF]):
        model = perturb(vp.attach(tiny_clip(), methods))
        with torch.no_grad():
            before = model.encode_image(IMAGES)
            torch.testing.assert_close(vp.merge(model).encode_image(IMAGES), before, rtol=1e-5, atol=1e-5)


def bias_free_attention_clip():
    model = tiny_clip()
    for blk in model.visual.transformer.resblocks:
        blk.attn = torch.nn.MultiheadAttention(D, 2, bias=False, batch_first=True)
    return model.eval()


def test_ssf_on_an_attention_without_biases_trains_and_refuses_merge_in_one_line():
    """The shift after a projection without bias would need a bias the plain model lacks: merge refuses rather than
    grow one (and refuses first, before any other method merged)."""
    model = perturb(vp.attach(bias_free_attention_clip(), [("lora", {"targets": ["fc1"]}), SSF]))
    model.encode_image(IMAGES).square().mean().backward()
    assert all(p.grad is not None for _, p in vp.trainable_parameters(model))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleMethodError) as err:
        vp.merge(model)
    message = str(err.value)
    assert "blocks.0.attn" in message and "no in_proj_bias" in message and "\n" not in message
    assert [name for name, _ in vp.attached_methods(model)] == ["lora", "ssf"]  # lora not merged either
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


@pytest.mark.parametrize(
    ("methods", "words"),
    [
        ([("fact", {})], "fact dropout acts on the core output, which has no weight-space form on blocks.0.attn.q"),
        ([("fact", {"dropout": 0.3, "variant": "tk"})], "set fact.dropout=0"),
        ([("lora", {"targets": ["q"]}), SSF], "ssf cannot scale blocks.0.attn.q: another attached method"),
        ([SSF, FACT_TT], "fact cannot adapt blocks.0.attn.q: another attached method"),
    ],
    ids=["fact-default-dropout", "fact-dropout", "lora-then-ssf", "ssf-then-fact"],
)
def test_refusals_are_one_line(methods, words):
    model = tiny_clip()
    keys = set(model.state_dict())
    with pytest.raises(IncompatibleMethodError) as err:
        vp.attach(model, methods)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert set(model.state_dict()) == keys and not vp.attached_methods(model)
