"""What a run needs from outside before it can train (its data, its pretrained weights), reported together.

Offline, a config whose data and weights are both missing used to name one of them per attempt: the data, then, a
run later, the weights. :func:`missing_inputs` puts every problem found into one message and names the offline demo
closest to the config (``configs/demo/``: a tiny pretrained ViT and data that come with visionpeft). The weights are
checked without downloading anything: a local checkpoint is read; pretrained weights are looked for only when the
hub cannot be reached (the model is then built in the hub's offline mode, which loads cached weights and fails at
once on missing ones); weights the hub can send are not missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..backbones import hub
from ..config import methods_of_config, read_config_file
from ..errors import DataError, ModelLoadError, VisionPEFTError
from ..io import shown_path

DEMOS = Path(__file__).resolve().parents[2] / "configs" / "demo"


def weights_problem(model_cfg: Any) -> str | None:
    """Why the weights of the ``model`` section ``model_cfg`` cannot be had now (None: they are at hand, or the hub
    can send them, or the model is randomly initialised); see the module docstring."""
    from ..backbones.factory import create_model

    if not model_cfg.get("checkpoint") and (not model_cfg.get("pretrained", False) or hub.hub_reachable()):
        return None
    try:
        create_model(model_cfg, num_classes=2)
    except VisionPEFTError as err:
        return str(err)
    return None


def offline_demo(config: Any) -> str:
    """The command of the offline demo closest to ``config``: the demo of the same method, else the first demo with
    ``method=NAME`` (or a pointer to ``configs/demo/`` when the configs are not next to the package)."""
    demos = sorted(DEMOS.glob("*.yaml"))
    if not demos:
        return "the configs/demo/ recipes of the visionpeft repository"
    names = [name for name, _ in methods_of_config(config)]
    for demo in demos:
        method = read_config_file(demo).get("method")
        if (method.get("name") if isinstance(method, dict) else method) == names[0]:
            return f"python tools/train.py {shown_path(demo)}"
    switch = f" method={names[0]}" if len(names) == 1 else ""
    return f"python tools/train.py {shown_path(demos[0])}{switch}"


def missing_inputs(config: Any, data_problems: list[str], weights: str | None = None) -> VisionPEFTError:
    """One error for everything missing: ``data_problems`` (the messages of the splits that could not be built),
    the weights (``weights``, the model's own error; looked up with :func:`weights_problem` when only data failed)
    and, offline or when the weights are missing, the offline demo to try instead. A :class:`DataError` when data
    is missing, else a :class:`ModelLoadError`."""
    if data_problems and weights is None:
        weights = weights_problem(config.model)
    problems = list(dict.fromkeys(data_problems)) + ([weights] if weights else [])
    if len(problems) > 1:
        listed = "; ".join(f"({i}) {problem.rstrip('.')}" for i, problem in enumerate(problems, start=1))
        text = f"{len(problems)} inputs of this config are missing: {listed}"
    else:
        text = problems[0].rstrip(".")
    if weights or not hub.hub_reachable():  # offline, or the weights are what is missing: what runs without them
        text += f". Without downloads, {offline_demo(config)} runs offline"
    return (DataError if data_problems else ModelLoadError)(text)
