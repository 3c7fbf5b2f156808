"""The benchmark tools measure what their tables say: the SD 1.5 layout is SD 1.5's, the mixed-precision steps step,
and the GPU suite runs end to end (on CPU, tiny models) and refuses a missing CUDA device in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.amp import Amp  # noqa: E402
from benchmarks.core import interleaved  # noqa: E402
from benchmarks.flops import shares, step_flops  # noqa: E402
from benchmarks.layouts import flux_parts, parameter_count, sd3_parts, sdxl_parts  # noqa: E402
from benchmarks.personalize import pipeline_parts  # noqa: E402


def test_sd15_layout_has_stable_diffusion_1_5s_parameter_counts():
    """The published sizes: U-Net 859,520,964, VAE 83,653,863, CLIP ViT-L/14 text encoder 123,060,480."""
    with torch.device("meta"):
        parts = pipeline_parts("sd15")
    assert [sum(p.numel() for p in m.parameters()) for m in parts] == [859_520_964, 83_653_863, 123_060_480]
    with pytest.raises(ValueError, match="layout must be one of"):
        pipeline_parts("sdxl")


def test_sdxl_parts_have_sdxl_base_1_0_s_parameter_counts_and_its_control_towers_theirs():
    """U-Net 2,567,463,684, VAE 83,653,863, CLIP ViT-L 123,060,480, OpenCLIP ViT-bigG + projection 694,659,840;
    ControlNetModel.from_unet 1,251,014,160 (diffusers' "1251M" for ControlNet-SDXL), T2I-Adapter full_adapter_xl
    79,028,160 ("79M")."""
    import visionpeft as vp

    with torch.device("meta"):
        parts = sdxl_parts()
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    assert counts == {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    }
    unet = parts["unet"]
    assert vp.count_parameters(vp.attach(unet, "controlnet"))["by_group"] == {"controlnet": 1_251_014_160}
    vp.detach(unet)
    xl = vp.attach(unet, "t2i_adapter", adapter_type="full_adapter_xl")
    assert vp.count_parameters(xl)["by_group"] == {"t2i_adapter": 79_028_160}


def test_flux_parts_have_flux_1_dev_s_parameter_counts_and_its_controlnet_the_script_s():
    """Transformer 11,901,408,320 (FLUX.1-dev's "12B"), VAE 83,819,683, CLIP ViT-L 123,060,480, T5-XXL encoder
    4,762,310,656 (T5 v1.1 XXL's "4.7B" encoder half); the README_flux ControlNet (4 double-stream, 0 single-stream
    blocks, FluxControlNetModel.from_transformer) 1,442,333,696."""
    from diffusers import FluxControlNetModel

    with torch.device("meta"):
        parts = flux_parts()
        controlnet = FluxControlNetModel.from_transformer(
            parts["transformer"],
            attention_head_dim=128,
            num_attention_heads=24,
            num_layers=4,
            num_single_layers=0,
            load_weights_from_transformer=False,
        )
    counts = {name: parameter_count(m) for name, m in parts.items()}
    assert counts == {
        "transformer": 11_901_408_320,
        "vae": 83_819_683,
        "text_encoder": 123_060_480,
        "text_encoder_2": 4_762_310_656,
    }
    assert parameter_count(controlnet) == 1_442_333_696


def test_sd3_parts_have_stable_diffusion_3_5_medium_s_parameter_counts():
    """The MMDiT: 2,243,171,520 parameters, 2,469,663,936 with the 384 x 384 position table its checkpoint stores
    (Stability's "2.5B" for SD3.5 medium); 24 blocks, 13 of them with the second image attention, RMS QK-norm.
    VAE 83,819,683 (16 latent channels), CLIP ViT-L + projection 123,650,304, OpenCLIP ViT-bigG + projection
    694,659,840, T5-XXL 4,762,310,656."""
    with torch.device("meta"):
        parts = sd3_parts()
    counts = {name: parameter_count(m) for name, m in parts.items()}
    assert counts == {
        "transformer": 2_243_171_520,
        "vae": 83_819_683,
        "text_encoder": 123_650_304,
        "text_encoder_2": 694_659_840,
        "text_encoder_3": 4_762_310_656,
    }
    transformer = parts["transformer"]
    assert parameter_count(transformer, buffers=True) == 2_469_663_936
    assert parameter_count(transformer, buffers=True) - counts["transformer"] == 384 * 384 * 1536
    blocks = transformer.transformer_blocks
    assert len(blocks) == 24 and sum(block.attn2 is not None for block in blocks) == 13
    assert transformer.inner_dim == 1536 and blocks[0].attn.norm_q is not None


def _clip_tflops(hidden: int, layers: int, tokens: int = 77, projection: bool = False) -> float:
    """A CLIP text tower's matmul FLOPs: per layer Q, K, V, O (4 h^2) and the MLP (8 h^2) on every token, two
    attention products (2 s^2 h), 2 FLOPs a multiply-add; a projection acts on the pooled token only."""
    per_layer = 2 * (12 * hidden**2 * tokens + 2 * tokens**2 * hidden)
    return (layers * per_layer + (2 * hidden**2 if projection else 0)) / 1e12


def test_step_flops_of_sdxl_count_both_clip_towers_and_the_unet_with_its_added_conditions():
    """On the meta device at 64 px (seconds): the three parts, the text side exactly CLIP ViT-L + OpenCLIP ViT-bigG
    (with its projection) in closed form, the shares summing to 1 and the cache ratios the parts' fractions."""
    parts = step_flops("sdxl", 64)
    assert list(parts) == ["vae encoder", "text encoders", "denoiser forward + backward"]
    text = _clip_tflops(768, 12) + _clip_tflops(1280, 32, projection=True)
    assert parts["text encoders"] == pytest.approx(text, rel=1e-9)
    assert parts["vae encoder"] > 0 and parts["denoiser forward + backward"] > 0
    share = shares(parts)
    assert sum(share[name] for name in parts) == pytest.approx(1.0)
    total = sum(parts.values())
    assert share["prompts cached"] == pytest.approx((total - text) / total)
    assert share["prompts and latents cached"] == pytest.approx(parts["denoiser forward + backward"] / total)
    with pytest.raises(ValueError, match="layout must be one of"):
        step_flops("sdxl_refiner", 64)


def test_personalize_times_only_the_sd_layouts_and_says_so_in_one_line(capsys):
    from benchmarks.personalize import main

    assert main(["--layout", "flux"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --layout flux is counted, not timed here: add --shares") and "\n" not in err


def test_interleaved_rotates_the_order_every_round_and_reads_the_clock_it_is_given():
    calls, ticks = [], iter(range(100))
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved(fns, 1, rounds=3, clock=lambda: next(ticks))
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")  # the warm-up call, then 3 rounds
    assert times == {"a": 1, "b": 1, "c": 1}  # each call spans one tick of the given clock


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_steps_the_optimizer_under_half_precision(precision):
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    before = layer.weight.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    amp = Amp("cpu", precision)
    with amp.autocast():
        out = layer(torch.randn(8, 4))
        assert out.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    amp.step(out.float().pow(2).mean(), optimizer)
    assert not torch.equal(layer.weight, before) and layer.weight.grad is None
    assert (amp.scaler is not None) == (precision == "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        Amp("cpu", "fp8")


def _gpu_suite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "benchmark.py"), "gpu", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_gpu_suite_runs_every_row_on_cpu_and_compares_with_the_peers():
    result = _gpu_suite("--device", "cpu", "--quick", "--precisions", "bf16")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for row in (
        "plain full fine-tuning",
        "visionpeft lora r8 q,v",
        "peft lora r8 qkv (peer)",
        "visionpeft vpt-deep 10",
        "| textual_inversion |",
        "| dreambooth_lora |",
        "| dreambooth_lora, latents cached |",
        "| sdxl dreambooth_lora |",
        "| sdxl controlnet |",
        "| flux dreambooth_lora |",
    ):
        assert row in out, row
    assert "x peft lora r8 qkv (peer)" in out and "bf16 autocast, sdpa attention" in out
    assert "sdxl layout tiny, batch 1, 32 px" in out and "flux layout tiny, batch 1, 32 px" in out
    assert "Traceback" not in result.stderr and "deprecat" not in out.lower()


@pytest.mark.parametrize("row", ["sdxl dreambooth_lora", "sdxl controlnet", "flux dreambooth_lora"])
def test_the_sdxl_and_flux_rows_step_the_same_loss_on_both_sides_and_train(row):
    """The GPU suite's rows on the tiny layouts, fp32: a fresh LoRA (B = 0) or ControlNet (zero convolutions) adds
    nothing, so each side's first step is the base model's loss on the same draws; the two are equal (<= 1e-6) only
    when both feed the denoiser the same latents, prompt states, added conditions / guidance, noise, timesteps and
    target. The second step on the same draws differs from the first: each side trained."""
    from benchmarks.family_steps import row_step

    first = {}
    for side in ("reference", "visionpeft"):
        step = row_step(row, side, "tiny", 32, 2, "cpu", "no")
        torch.manual_seed(5)
        first[side] = step()
        torch.manual_seed(5)
        assert (step() - first[side]).abs() > 1e-6, side
    torch.testing.assert_close(first["visionpeft"], first["reference"], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_gpu_suite_without_cuda_is_one_line():
    result = _gpu_suite("--tables", "vit")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith("error: no CUDA device here")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("suite", "rows"),
    [
        ("zoo", ["| full |", "| repadapter b8 |", "| adapter houlsby b8 |", "| vqt |", "| fact tt d8 | "]),
        ("lycoris", ["| loha r8 qkv |", "| boft block 4 qkv |", "| ia3 qkv, fc2 (ff) |"]),
    ],
)
def test_zoo_and_lycoris_suites_run_every_row(suite, rows):
    """The [zoo] and LyCORIS step tables run end to end on a tiny ViT (--quick) and print every row."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "benchmark.py"), suite, "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(row in result.stdout for row in rows), result.stdout


def test_diffusion_demo_add_extends_the_finished_gallery_and_says_so(tmp_path, capsys):
    """``diffusion-demo --add`` keeps the base samples and earlier rows, records its command beside the first one
    (the README names both), and without a finished gallery refuses in one line."""
    from benchmarks.diffusion_demo import added_to, main, write_readme

    pipeline = tmp_path / "pipe"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    code = main(["--add", "--methods", "dreambooth_oft", "--pipeline", str(pipeline), "--out", str(tmp_path / "g")])
    assert code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    row = {"prompt": "p", "trainable": 10, "steps": 3, "before": 0.0, "after": 0.5, "minutes": 1.0}
    finished = {
        "command": "python tools/benchmark.py diffusion-demo",
        "steps": 20,
        "seeds": [0],
        "minutes": 3.0,
        "base": {
            "rates": {"a handwritten digit one": {"subject": "digit 1", "rate": 1.0, "n": 2, "held_out": False}},
            "kid": {},
        },
        "personalization": {"dreambooth_lora": [row]},
    }
    (tmp_path / "results.json").write_text(json.dumps(finished))
    results = added_to(tmp_path / "results.json", "python tools/benchmark.py diffusion-demo --add")
    assert results["base"] == finished["base"] and results["personalization"] == finished["personalization"]
    results["personalization"]["dreambooth_oft"] = [row]
    write_readme(results, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "then `python tools/benchmark.py diffusion-demo --add`" in text
    assert "| DreamBooth-LoRA |" in text and "| DreamBooth-OFT |" in text
    assert "Embedded pretrained pipelines: the SD 1.x layout (`checkpoints/tiny_sd`" in text
    assert "the Flux layout (`checkpoints/tiny_flux`" in text
    # what the sentence says is what checkpoints/ holds (another pipeline landing must change the sentence)
    indexes = {
        p.parent.name: json.loads(p.read_text())["_class_name"] for p in ROOT.glob("checkpoints/*/model_index.json")
    }
    assert indexes == {"tiny_sd": "StableDiffusionPipeline", "tiny_flux": "FluxPipeline"}


def test_diffusion_demo_of_a_flux_pipeline_writes_its_own_gallery(tmp_path):
    """A ``FluxPipeline`` folder gets the Flux header (true CFG, T5 length), the tiny_flux configs and README
    command, and refuses textual inversion in one line."""
    from benchmarks.diffusion_demo import family_of, main, write_readme

    pipeline = tmp_path / "pipe"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert family_of(pipeline) == "flux" and family_of(ROOT / "checkpoints" / "tiny_sd") == "sd"
    assert main(["--pipeline", str(pipeline), "--methods", "textual_inversion", "--out", str(tmp_path / "g")]) == 2
    row = {"prompt": "p", "trainable": 10, "steps": 3, "before": 0.0, "after": 0.5, "minutes": 1.0}
    results = {
        "command": "python tools/benchmark.py diffusion-demo --pipeline checkpoints/tiny_flux",
        "family": "flux",
        "steps": 20,
        "seeds": [0],
        "minutes": 3.0,
        "base": {
            "rates": {"a handwritten digit one": {"subject": "digit 1", "rate": 1.0, "n": 2, "held_out": False}},
            "kid": {},
        },
        "personalization": {"dreambooth_lora": [row], "difffit": [row]},
    }
    write_readme(results, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# Diffusion, offline: the embedded tiny Flux-layout pipeline")
    assert "true classifier-free guidance 3.0" in text and "configs/personalize/<method>_tiny_flux.yaml" in text
    assert "| DreamBooth-LoRA |" in text and "| DiffFit |" in text
