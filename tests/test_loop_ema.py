"""The training loop's EMA and state: the finished model holds diffusers' EMAModel average of the trained weights,
evaluation sees the average, and a resumed run (whose state holds only trained tensors) continues it exactly."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from tiny_models import tiny_vit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import visionpeft as vp
from visionpeft.trainers.loop import Loop, LoopConfig, make_accelerator


class Regression:
    metric = "neg_loss"

    def __init__(self, loader) -> None:
        self.loader = loader
        self.seen: list[torch.Tensor] = []

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    def evaluate(self, model: nn.Module, accelerator) -> dict[str, float]:
        linear = model.head if isinstance(model.head, nn.Linear) else model.head[-1]
        self.seen.append(linear.weight.detach().clone())  # the weights evaluation ran with
        return {"neg_loss": -sum(self.loss(model, b).item() for b in self.loader)}


def _loop(run_dir, decay, epochs=3, seed=0, model=None):
    model = model if model is not None else vp.attach(tiny_vit(), "linear")  # a linear probe: the head trains
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, 32, 32, generator=generator)
    data = TensorDataset(x, torch.randn(16, 10, generator=generator))  # the tiny ViT has 10 classes
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed))
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = LoopConfig(epochs=epochs, ema_decay=decay, log_every=1)
    optimizer = torch.optim.SGD([p for _, p in vp.trainable_parameters(model)], lr=0.05)
    return Loop(
        model,
        Regression(DataLoader(data, batch_size=8)),
        optimizer,
        loader,
        run_dir,
        cfg,
        make_accelerator(cfg, cpu=True),
        select_best=False,
    )


def test_finished_model_holds_the_ema_of_every_step(tmp_path):
    loop = _loop(tmp_path / "ema", decay=0.8)
    trajectory = [loop.unwrapped.head.weight.detach().clone()]
    loop.optimizer.step = _recording(loop.optimizer.step, loop.unwrapped, trajectory)
    loop.fit()
    expected = trajectory[0]
    for step, weight in enumerate(trajectory[1:], start=1):  # EMAModel: decay 0 at step 1, then (1+s)/(10+s) <= 0.8
        decay = 0.0 if step == 1 else min(0.8, step / (9 + step))
        expected = decay * expected + (1 - decay) * weight
    torch.testing.assert_close(loop.unwrapped.head.weight.detach(), expected)
    assert not torch.allclose(expected, trajectory[-1])  # the average is not the last step
    torch.testing.assert_close(loop.objective.seen[-1], expected)  # evaluation used the average too


def _recording(step, model, trajectory):
    def wrapped(*args, **kwargs):
        out = step(*args, **kwargs)
        trajectory.append(model.head.weight.detach().clone())
        return out

    return wrapped


def test_resumed_run_continues_the_average_exactly(tmp_path):
    straight = _loop(tmp_path / "straight", decay=0.9)
    straight.fit()
    first = _loop(tmp_path / "split", decay=0.9)
    first.fit(stop_after=1)
    saved = load_file(tmp_path / "split" / "state" / "model.safetensors")
    assert set(saved) == {"head.weight", "head.bias"}  # the trained tensors only, not the frozen backbone
    resumed = _loop(tmp_path / "split", decay=0.9)
    resumed.load_state()
    assert resumed.ema.optimization_step == first.ema.optimization_step == 4
    resumed.fit()
    torch.testing.assert_close(resumed.unwrapped.head.weight, straight.unwrapped.head.weight, rtol=0, atol=0)


def test_resume_restores_the_buffers_of_trained_modules(tmp_path):
    """A head with BatchNorm: its running statistics are part of the resumable state, so a resumed run ends with
    the same statistics (and weights) as an uninterrupted one."""
    from test_core_buffers import bn_head_vit

    def bn_loop(name):
        return _loop(tmp_path / name, decay=None, model=vp.attach(bn_head_vit(), "vpt", num_tokens=2))

    straight = bn_loop("straight")
    straight.fit()
    first = bn_loop("split")
    first.fit(stop_after=1)
    saved = load_file(tmp_path / "split" / "state" / "model.safetensors")
    assert {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked"} <= set(saved)
    assert int(saved["head.0.num_batches_tracked"]) == 4  # one epoch of 4 training batches
    resumed = bn_loop("split")
    resumed.load_state()
    resumed.fit()
    for name, tensor in straight.unwrapped.head.state_dict().items():
        torch.testing.assert_close(resumed.unwrapped.head.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
