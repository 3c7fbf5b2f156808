"""Per-block learning rates of a U-Net (``optim.block_lr``): sd-scripts' ``down_lr_weight`` / ``mid_lr_weight`` /
``up_lr_weight`` on visionpeft's canonical U-Net names.

sd-scripts (``networks/lora.py``, ``get_block_lr_weight`` and ``get_block_index``) gives each U-Net position its
own learning-rate weight: 12 down positions (``3 * i + j`` over diffusers' ``down_blocks.i``, resnet / attention
``j``, the downsampler at ``j = 2``), one mid and 12 up positions on SD 1.x; it multiplies the U-Net lr of every LoRA
module at that position (``prepare_optimizer_params``). Here a mapping names the same places by the U-Net tower's
canonical names: ``down`` / ``mid`` / ``up`` (a whole side), a stage ``down.1`` (diffusers' ``down_blocks.1``), or a
block ``down.1.attn.0`` / ``down.1.resnet.0`` (sd-scripts' positions 4 and 3); the most specific key naming a
tensor's place sets its multiplier (``{down: 0.5, down.2: 1}``: the first two down stages at half the rate). A
tensor outside every transformer / resnet block (a LoRA on ``proj_in`` or a downsampler) takes its stage's key.
"""

from __future__ import annotations

from torch import nn

from ..adapter import require_state
from ..errors import ConfigError


def block_lr_multipliers(block_lr: dict[str, float], adapted: nn.Module) -> dict[str, float]:
    """``optim.block_lr`` as :class:`~.run.Setup` ``lr_multipliers``: parameter-name prefixes (module paths of the
    U-Net's blocks and stages in ``adapted``), most specific first.

    Raises:
        ConfigError: A key that names no place of this U-Net, in one line with the stages it has.
    """
    if not block_lr:
        return {}
    tower = require_state(adapted).backbone.tower("unet")
    paths = {id(module): path for path, module in adapted.named_modules()}
    places = {name: module for name, module in tower.stages.items() if name.split(".")[0] in ("down", "mid", "up")}
    places.update({block.name: block.module for block in tower.blocks})
    for key in block_lr:
        if not any(name == key or name.startswith(key + ".") for name in places):
            stages = ", ".join(name for name in tower.stages if name.split(".")[0] in ("down", "mid", "up"))
            raise ConfigError(f"optim.block_lr key '{key}' names no block of this U-Net; its stages: {stages}")
    found: dict[str, float] = {}
    for name, module in places.items():
        keys = [key for key in block_lr if name == key or name.startswith(key + ".")]
        if keys:
            found[paths[id(module)] + "."] = float(block_lr[max(keys, key=len)])
    return dict(sorted(found.items(), key=lambda item: -len(item[0])))
