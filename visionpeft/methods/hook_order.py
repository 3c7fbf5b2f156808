"""Where a method's hook on a library layer sits among other methods' updates of that layer, which decides when a
multiplicative method (ssf's scale and shift, ia3's vectors) can fold into the layer's weights exactly.

A forward hook sees the layer's output. What another method put there before it - a wrapper the hook was put on
(``lora`` attached first), or a forward hook registered earlier (``fact``'s increments) - is *inside* the scaled
output, so the scale folds after that method's update: ``s (W + dW) = s W + s dW``. A wrapper put around the layer
later, or a forward hook registered later, is *outside*, so the scale folds first: ``s W + dW``. A forward pre-hook
scales the input every forward hook of the layer then sees, so those are all inside it; so is a wrapper that runs
the layer on a weight transformed on its input side (OFT's ``W R``, BOFT's with its rows scaled too: a wrapper whose
``additive`` is False): ``W R (l x)`` folds ``R`` first, while an output scale folds before or after ``R`` alike.
Inside one update and outside another at once, no merge order is exact. Neither is a scale inside an update that
reads the base weight (DoRA normalises the rows of ``W + dW``: folding the scale into ``W`` first changes those
norms).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..errors import IncompatibleMethodError

#: merge_priority of a scale folding after the additive updates (0) of its layer, and of one folding before them;
#: both before the output scales (DiffFit's gamma, priority 1) that multiply it too.
AFTER_UPDATES, BEFORE_UPDATES = 0.5, -1


@dataclass
class HookSite:
    """One hook of a method on a layer.

    Attributes:
        name: The site's canonical name, for messages.
        layer: The module the hook is registered on (a library layer or a wrapper of one).
        hook_id: The hook handle's id.
        pre: A forward pre-hook (it scales the input) rather than a forward hook.
    """

    name: str
    layer: nn.Module
    hook_id: int
    pre: bool = False


@dataclass
class SiteOrder:
    """The sites whose layer another method updates inside the hook, those it updates outside it, and those inside
    an outer update that reads the base weight (DoRA)."""

    inside: list[str]
    outside: list[str]
    weight_reading: list[str]

    @property
    def merge_priority(self) -> float:
        return AFTER_UPDATES if self.inside and not self.outside else BEFORE_UPDATES

    def check_foldable(self, method: str) -> None:
        """Raises :class:`IncompatibleMethodError` when no merge order folds ``method`` exactly (one line)."""
        if self.weight_reading:
            raise IncompatibleMethodError(
                f"{method} at {self.weight_reading[0]} sits inside a DoRA update of that layer (attached after "
                f"{method}), which normalises the rows of the weight the scale would fold into; attach {method} "
                "after the DoRA method to merge"
            )
        if self.inside and self.outside:
            raise IncompatibleMethodError(
                f"{method} sits outside the update of {self.inside[0]} but inside the update of {self.outside[0]} "
                "(attached in between two methods wrapping layers), so no merge order folds both exactly"
            )


def site_order(model: nn.Module, sites: Iterable[HookSite]) -> SiteOrder:
    """Where each of ``sites`` sits among the other updates of its layer in ``model`` (see the module docstring)."""
    wrappers = {id(m.base): m for m in model.modules() if getattr(m, "_vp_wrapper", False)}
    order = SiteOrder([], [], [])
    for site in sites:
        layer = site.layer
        outer = wrappers.get(id(layer))
        transform = outer is not None and not getattr(outer, "additive", True)
        if site.pre:  # an outer transform runs the base on its own weight: the scaled input meets W R
            inside = bool(layer._forward_hooks) or transform
            outside = outer is not None and not transform
        else:
            hooks = list(layer._forward_hooks)
            position = hooks.index(site.hook_id) if site.hook_id in hooks else len(hooks)
            # an outer transform's weight, W R (times output-row scales), takes an output scale in either order
            inside, outside = position > 0, (outer is not None and not transform) or position < len(hooks) - 1
        if getattr(layer, "_vp_wrapper", False) or inside:
            order.inside.append(site.name)
        if outside:
            order.outside.append(site.name)
        if getattr(outer, "dora", False):
            order.weight_reading.append(site.name)
    return order
