"""tools/train.py (task class_conditional) on a tiny DiTPipeline: DiffFit fine-tunes the DiT to new labelled
classes with DiT's own objective, and the merged folder loads in DiTPipeline with the new class names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import train as tool  # noqa: E402
from _run_args import train_args
from PIL import Image
from tiny_models import tiny_dit_pipeline

import visionpeft as vp
from visionpeft.backbones.diffusers_loading import load_pipeline
from visionpeft.cli.common import run  # noqa: E402
from visionpeft.trainers.diffusion import training_scheduler
from visionpeft.trainers.dit_loss import class_conditional_loss, variational_bound

COLOURS = {"blue": (20, 40, 220), "red": (230, 30, 20)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dit")
    tiny_dit_pipeline().save_pretrained(tmp / "pipe")
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (tmp / "data" / "train" / name).mkdir(parents=True)
        for i in range(4):  # not square: DiT's resize + centre crop must handle it
            array = np.clip(np.array(colour) + rng.normal(0, 20, (20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(array).save(tmp / "data" / "train" / name / f"{i}.png")
    return tmp


def _batch(setup):
    from visionpeft.trainers.class_conditional import Labelled

    data = Labelled(__import__("torchvision").datasets.ImageFolder(setup / "data" / "train"), 16, flip=False)
    images, labels = zip(*(data[i] for i in range(len(data))), strict=True)
    return torch.stack(images), torch.tensor(labels)


def fixed_loss(pipe, images, labels, draws=6) -> float:
    scheduler = training_scheduler(pipe)
    with torch.no_grad():
        return float(
            np.mean(
                [
                    class_conditional_loss(
                        pipe.transformer,
                        pipe.vae,
                        scheduler,
                        images,
                        labels,
                        generator=torch.Generator().manual_seed(d),
                    )
                    .mean()
                    .item()
                    for d in range(draws)
                ]
            )
        )


def _finetune(setup, name, *overrides):
    args = train_args(
        "class_conditional/difffit_dit_xl2_256",
        setup / "runs",
        name,
        f"model.name={setup / 'pipe'}",
        f"data.root={setup / 'data'}",
        "data.size=null",
        "optim.steps=30",
        "data.batch_size=4",
        "optim.lr=0.02",
        "train.ema_decay=0.5",
        "train.validation_classes=[red, blue]",
        "train.eval_every=16",
        "train.validation_steps=2",
        "train.validation_images=2",
        *overrides,
    )
    return run(tool.main, args)


def test_difffit_finetunes_new_classes_and_the_merged_pipeline_loads_in_diffusers(setup, capsys):
    from diffusers import DiTPipeline

    assert _finetune(setup, "difffit") == 0
    run_dir = setup / "runs" / "difffit"
    losses = [
        json.loads(x)["train/loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "train/loss" in x
    ]
    assert len(losses) == 30
    assert len(list((run_dir / "validation").glob("*.png"))) == 2  # after 16 and 30 steps, one row per class

    merged = DiTPipeline.from_pretrained(run_dir / "merged")
    assert merged.get_label_ids(["blue", "red"]) == [0, 1]  # ImageFolder's sorted classes, named in id2label
    images, labels = _batch(setup)
    pretrained = load_pipeline(str(setup / "pipe"))
    assert fixed_loss(merged, images, labels) < 0.9 * fixed_loss(pretrained, images, labels)

    ours = vp.load_adapter(load_pipeline(str(setup / "pipe")), run_dir / "adapter")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    with torch.no_grad():
        expected = ours.transformer(x, timestep=t, class_labels=labels[:2]).sample
        torch.testing.assert_close(
            merged.transformer(x, timestep=t, class_labels=labels[:2]).sample, expected, rtol=1e-4, atol=1e-5
        )
    table = merged.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    before = pretrained.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert not torch.equal(table[:2], before[:2])  # the new classes' rows were re-initialised and trained
    assert torch.equal(table[2:1000], before[2:1000])  # the rows no class uses are untouched
    assert merged(labels[:1].tolist(), num_inference_steps=2, generator=g).images[0].size == (16, 16)


def test_labels_are_dropped_once_per_sample_not_per_block(setup):
    from omegaconf import OmegaConf

    from visionpeft.config.class_conditional import ClassConditionalConfig
    from visionpeft.trainers.class_conditional import ClassDenoiser

    pipe = vp.attach(load_pipeline(str(setup / "pipe")), "difffit")
    cfg = OmegaConf.merge(OmegaConf.structured(ClassConditionalConfig), {"train": {"class_dropout": 0.0}})
    denoiser = ClassDenoiser(pipe, cfg)
    vp.set_train_mode(pipe.transformer, True)
    images, labels = _batch(setup)
    torch.manual_seed(0)
    loss = denoiser((images, labels))
    assert denoiser.label_embedders and not any(e.training for e in denoiser.label_embedders)
    assert denoiser.null_class == 1000
    torch.manual_seed(0)
    torch.rand(len(labels))  # the denoiser's own dropout draw
    expected = class_conditional_loss(pipe.transformer, pipe.vae, training_scheduler(pipe), images, labels).mean()
    torch.testing.assert_close(loss, expected)


def test_variational_bound_is_the_gaussian_kl_in_bits():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([5, 400, 999])
    xt = scheduler.add_noise(x0, noise, t)
    exact = variational_bound(scheduler, x0, xt, t, noise, -torch.ones_like(x0))  # true noise, posterior variance
    torch.testing.assert_close(exact, torch.zeros(3), atol=1e-5, rtol=0)
    eps, v = noise + 0.1 * torch.randn(3, 4, 2, 2, generator=g), torch.rand(3, 4, 2, 2, generator=g) * 2 - 1
    ours = variational_bound(scheduler, x0, xt, t, eps, v)
    # reference: torch.distributions on the DDPM posterior and the model's learned-range Gaussian
    betas = scheduler.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    var = betas * (1 - prev) / (1 - abar)
    c0, ct = betas * prev.sqrt() / (1 - abar), (1 - prev) * (1 - betas).sqrt() / (1 - abar)
    for i, step in enumerate(t.tolist()):
        x0_hat = (xt[i] - (1 - abar[step]).sqrt() * eps[i]) / abar[step].sqrt()
        log_var = (v[i] + 1) / 2 * betas[step].log() + (1 - v[i]) / 2 * var[step].log()
        q = torch.distributions.Normal(c0[step] * x0[i] + ct[step] * xt[i], var[step].sqrt())
        p = torch.distributions.Normal(c0[step] * x0_hat + ct[step] * xt[i], (0.5 * log_var).exp())
        kl = torch.distributions.kl_divergence(q, p).mean() / np.log(2)
        assert ours[i].item() == pytest.approx(kl.item(), rel=1e-3)  # float32 vs float64
    assert variational_bound(scheduler, x0, xt, torch.zeros(3, dtype=torch.long), eps, v).min() > 0  # decoder NLL


def test_mistakes_are_one_line(setup, capsys):
    assert _finetune(setup, "bad1", "train.validation_classes=[green]") == 2
    assert "train.validation_classes ['green'] are not classes of the dataset (blue, red)" in capsys.readouterr().err
    assert _finetune(setup, "bad2", "method={name: lora, r: 2}") == 2
    assert "does not train the class table; use data.class_init=keep" in capsys.readouterr().err
    assert _finetune(setup, "bad3", f"data.root={setup / 'nowhere'}") == 2
    assert "does not exist" in capsys.readouterr().err
    assert _finetune(setup, "bad4", "data.class_init=fresh") == 2
    assert "data.class_init' must be one of normal, keep" in capsys.readouterr().err


def test_resumed_run_repeats_the_uninterrupted_one(setup):
    def losses(name):
        lines = (setup / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["train/loss"] for x in lines if "train/loss" in x]

    short = ["optim.steps=8", "train.validation_classes=[]"]
    assert _finetune(setup, "straight", *short) == 0
    assert _finetune(setup, "split", *short, "--stop-after", "2") == 0
    assert len(losses("split")) == 4
    assert run(tool.main, ["--resume", str(setup / "runs" / "split"), "--cpu"]) == 0
    assert losses("split") == losses("straight")


def test_bf16_mixed_precision_keeps_trained_weights_in_fp32(setup):
    assert _finetune(setup, "bf16", "train.mixed_precision=bf16", "optim.steps=4", "train.eval_every=4") == 0
    run_dir = setup / "runs" / "bf16"
    assert len(list((run_dir / "validation").glob("*.png"))) == 1  # sampled under autocast with bf16 frozen weights
    from safetensors.torch import load_file

    saved = load_file(run_dir / "adapter" / "visionpeft_adapter.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
