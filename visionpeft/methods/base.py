"""The method interface: a config dataclass plus a :class:`Method` that attaches to a backbone.

A method owns everything it adds (modules, side towers, forward hooks, wrappers) and records the tensors it trains
under canonical names (``blocks.3.attn.q.lora_A``), so checkpoints say what they change and not where a library
keeps it. Parameters of the backbone itself that a method trains in place (BitFit's biases, DiffFit's norms) are
named ``base.<module path>`` and their original values are kept so that ``detach`` can restore the model exactly.

A method also declares what it can do and what it needs, so the code around it never names a method:
``merges_exactly``, ``export_formats`` (+ :meth:`Method.export_parts`), ``task_inputs`` (options a task fills in),
``call_inputs`` (per-call inputs read through the conditioning channel), ``requires`` (tower capabilities) and
``provides`` (capabilities task models ask for, such as ``class_text_features``), and ``diffusers_folder_class`` (the
diffusers model whose ``save_pretrained`` folder holds the method's result: ``methods.folders`` reads such a folder
back as the method). :func:`register_method` files a method under its own ``name`` and checks these declarations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..backbones.base import Backbone, Block, Branch, Tower
from ..backbones.module_paths import TargetSpec, find_modules, library_modules
from ..errors import ConfigError, IncompatibleMethodError
from ..registry import METHODS
from ..schema import check_fields, setting


@dataclass
class MethodConfig:
    """Options shared by every method.

    Attributes:
        tower: Which tower to adapt (``vision``/``text`` on CLIP); None means the backbone's main tower.
    """

    tower: str | None = setting(None, "the tower to adapt (vision / text on CLIP); null: the main one")

    def __post_init__(self) -> None:
        """A config is checked as it is built (by ``make_config``, by hand or by ``dataclasses.replace``), so one
        that exists holds values inside the choices and ranges its fields declare and is passed on as it is."""
        name = registered_method_of(type(self)) or type(self).__name__
        check_fields(type(self), self, subject=f"method '{name}' option")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def registered_method_of(config_class: type[MethodConfig]) -> str | None:
    """The registered name of the method whose options ``config_class`` holds, or None."""
    return next((n for n in METHODS.names() if METHODS.get(n).config_class is config_class), None)


#: The key prefix of embeddings bundled in a kohya LoRA file: ``bundle_emb.<name>.string_to_param.*`` (SD 1.x / 2.x)
#: or ``bundle_emb.<name>.clip_l`` / ``.clip_g`` (SDXL), as A1111 reads them (``extensions-builtin/Lora/networks.py``,
#: ``load_network``: a key whose part before the first dot is ``bundle_emb`` names an embedding and its tensor).
BUNDLE_PREFIX = "bundle_emb."


@dataclass
class ExportParts:
    """What one method contributes to a file format of another library.

    Attributes:
        lora_layers: Model-relative module path -> ``(A, B)`` of a low-rank update, its scale folded into B. For the
            ``diffusers`` format the path starts with the pipeline component (``unet.``, ``text_encoder.``).
        magnitudes: Module path -> DoRA magnitude vector of a layer in ``lora_layers`` (PEFT's
            ``lora_magnitude_vector``, in PEFT's shape); layers without one are plain LoRA.
        files: File name -> tensors, for files the method's result fills alone (``learned_embeds.safetensors``).
        head: The method's result lives in the task heads (a linear probe), which the format stores.
        models: Folder name -> a function returning a model of the library to write with its ``save_pretrained``
            (a ControlNet: ``ControlNetModel.from_pretrained`` reads the folder); built only when written.
        adapter_tensors: The layers of an adapter type other than LoRA, in the format's own layout: tensor key
            relative to the model (PEFT's key without ``base_model.model.``: ``blocks.0.attn.qkv.hada_w1_a``) ->
            tensor.
        adapter_config: The format's config of ``adapter_tensors`` (PEFT: the ``adapter_config.json`` fields of the
            adapter type, ``peft_type``, its options and ``target_modules``); the format holds one.
        bundled: Tensors a one-file format holds beside the layers under keys of their own (textual inversion's
            embeddings inside a kohya LoRA file, keys starting with :data:`BUNDLE_PREFIX`, read by A1111).
    """

    lora_layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)
    files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    head: bool = False
    models: dict[str, Callable[[], nn.Module]] = field(default_factory=dict)
    adapter_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    adapter_config: dict[str, Any] = field(default_factory=dict)
    bundled: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def contributes(self) -> bool:
        return bool(self.lora_layers or self.files or self.head or self.models or self.adapter_tensors or self.bundled)

    @property
    def adapts_layers(self) -> bool:
        """The part changes layers of the model (LoRA layers or another adapter type's), not only files or heads."""
        return bool(self.lora_layers or self.adapter_tensors)


def named_base_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """Yields ``(name, owner, attr)`` for the model's own parameters, as named before visionpeft touched it.

    Modules added by methods are skipped and wrappers are looked through (``qkv.base.weight`` is ``qkv.weight``).
    """
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, str]]:
        for attr, param in module._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                yield prefix + attr, module, attr
        wrapper = getattr(module, "_vp_wrapper", False)
        for child_name, child in module._modules.items():
            if child is None or getattr(child, "_vp_owned", False) or (wrapper and child_name != "base"):
                continue
            yield from walk(child, prefix if wrapper else f"{prefix}{child_name}.")

    yield from walk(model, "")


def base_module_paths(model: nn.Module) -> dict[int, str]:
    """id(library module with parameters) -> its path in the model as it was before wrapping."""
    paths: dict[int, str] = {}
    for name, owner, _ in named_base_parameters(model):
        paths.setdefault(id(owner), name.rpartition(".")[0])
    return paths


def _remember(seen: list, tokens: torch.Tensor) -> torch.Tensor:
    seen[:] = [tokens]
    return tokens


def named_persistent_buffers(module: nn.Module, skip: str | None = None) -> Iterator[tuple[str, nn.Module, str]]:
    """Yields ``(path, owner, attr)`` of the buffers a ``state_dict`` of ``module`` holds (non-persistent ones and
    ``None`` slots left out); children named ``skip`` (a wrapper's ``base``) are not entered."""
    for path, owner in module.named_modules():
        if skip is not None and (path == skip or path.startswith(skip + ".")):
            continue
        for attr, buffer in owner._buffers.items():
            if buffer is not None and attr not in owner._non_persistent_buffers_set:
                yield f"{path}.{attr}" if path else attr, owner, attr


def branch_tensor(output: Any) -> torch.Tensor:
    """The tensor of a branch output (``nn.MultiheadAttention`` returns ``(output, weights)``)."""
    return output[0] if isinstance(output, tuple) else output


def replace_branch_tensor(output: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


class Method:
    """Base class of methods. Subclasses set the class attributes and implement :meth:`build`.

    Args:
        config: The method's config dataclass.
        backbone: The backbone adapter of the model.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: The paper keeps the frozen backbone in eval mode during training (VPT).
    frozen_eval: ClassVar[bool] = False
    #: ``merge`` folds the method into the backbone weights exactly.
    merges_exactly: ClassVar[bool] = False
    #: Merge order among merged methods: additive weight updates (0) fold in before output scales (1).
    merge_priority: ClassVar[int] = 0
    #: Tower capability -> what the method needs, in words (the error message when the tower lacks it).
    requires: ClassVar[dict[str, str]] = {}
    #: Capabilities task models may ask for, each a method of the same name (``class_text_features()``,
    #: ``image_logits(image_features)``).
    provides: ClassVar[frozenset[str]] = frozenset()
    #: Formats of other libraries whose files can hold this method (:meth:`export_parts` writes its part).
    export_formats: ClassVar[frozenset[str]] = frozenset()
    #: Config options a task fills in when the user did not give them (class names, a placeholder token).
    task_inputs: ClassVar[tuple[str, ...]] = ()
    #: Per-call inputs read through the conditioning channel (:meth:`call_input`), e.g. a control image.
    call_inputs: ClassVar[tuple[str, ...]] = ()
    #: The diffusers model class (``config.json``'s ``_class_name``) of a ``save_pretrained`` folder that holds this
    #: method's result and is read back as this method (:meth:`options_from_folder`, :meth:`load_folder_model`); a
    #: tuple when the method builds one class per model family (ControlNet: U-Net, Flux, SD3).
    diffusers_folder_class: ClassVar[str | tuple[str, ...] | None] = None
    #: Several of this method may attach to one tower (two ControlNets, each on its own condition image).
    several: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, backbone: Backbone) -> None:
        self.config = config
        self.backbone = backbone
        #: The name this attached method goes by: its ``name``, or for the second, third ... of a :attr:`several`
        #: method on one tower ``name_1``, ``name_2`` (in attach order), as ``vp.conditioning``'s per-method inputs
        #: and ``count_parameters`` name it.
        self.key = self.name
        try:
            self.tower: Tower = backbone.tower(config.tower)
        except IncompatibleMethodError as err:
            raise IncompatibleMethodError(f"{self.name} cannot attach to this model: {err}") from None
        self.tensors: dict[str, tuple[nn.Module, str]] = {}
        self.buffers: dict[str, tuple[nn.Module, str]] = {}
        self._hooks: list[RemovableHandle] = []
        self._added: list[tuple[nn.Module, str]] = []
        self._wrapped: list[tuple[nn.Module, str, nn.Module]] = []
        self._originals: dict[str, torch.Tensor] = {}

    # -- lifecycle -------------------------------------------------------------------------------------------
    def check_fits(self) -> None:
        """Raises :class:`IncompatibleMethodError` if the method cannot adapt this tower."""
        for capability, needed in self.requires.items():
            if capability not in self.tower.capabilities:
                raise IncompatibleMethodError(
                    f"{self.name} needs {needed}; the {self.backbone.family} '{self.tower.name}' tower has none"
                )

    def build(self) -> None:
        """Adds the method's modules and hooks. Called once by :meth:`attach`."""
        raise NotImplementedError

    def attach(self) -> None:
        self.check_fits()
        self.build()

    def detach(self) -> None:
        """Removes everything the method added and restores the backbone tensors it trained in place."""
        for handle in reversed(self._hooks):
            handle.remove()
        for parent, attr, original in reversed(self._wrapped):
            setattr(parent, attr, original)
        for parent, attr in reversed(self._added):
            delattr(parent, attr)
        with torch.no_grad():
            for name, original in self._originals.items():
                module, attr = self.tensors[name]
                getattr(module, attr).copy_(original)
        self._hooks, self._wrapped, self._added, self._originals = [], [], [], {}
        self.tensors, self.buffers = {}, {}

    def merge(self) -> None:
        """Folds the method into the backbone weights; afterwards :meth:`forget` drops it."""
        raise IncompatibleMethodError(f"{self.name} cannot be merged into the backbone weights exactly")

    def forget(self) -> None:
        """Drops the method's bookkeeping without undoing its effect on the weights (after a merge)."""
        for handle in self._hooks:
            handle.remove()
        for parent, attr, _ in self._wrapped:
            wrapper = getattr(parent, attr)
            setattr(parent, attr, wrapper.base)
        for parent, attr in self._added:
            delattr(parent, attr)
        self._hooks, self._wrapped, self._added, self._originals = [], [], [], {}
        self.tensors, self.buffers = {}, {}

    def placed_wrappers(self) -> list[nn.Module]:
        """The wrappers this method put in place of library modules (``merge`` + ``forget`` removes them)."""
        return [getattr(parent, attr) for parent, attr, _ in self._wrapped]

    def hooks_module(self, module: nn.Module) -> bool:
        """Whether one of this method's forward (pre-)hooks is registered on ``module``."""
        hook_dicts = (module._forward_hooks, module._forward_pre_hooks)
        return any(any(handle.hooks_dict_ref() is d for d in hook_dicts) for handle in self._hooks)

    def diagnostics(self) -> dict[str, float]:
        """Numbers worth logging about the method's last forward (a control's residual norms); none by default."""
        return {}

    @property
    def exports_base_weights(self) -> bool:
        """The ``diffusers`` export writes backbone weights (a whole U-Net), which a training copy stored in lower
        precision holds rounded: the trainer then exports from a full-precision copy with the adapter loaded."""
        return False

    def export_parts(self, format: str) -> ExportParts:
        """The method's part of a file in ``format`` (one of :attr:`export_formats`).

        Raises:
            CheckpointError: The format cannot hold this particular adaptation.
        """
        return ExportParts()

    @classmethod
    def options_from_folder(cls, folder_config: dict[str, Any]) -> dict[str, Any]:
        """The method's options that rebuild the model of a :attr:`diffusers_folder_class` folder, from the config
        of the model diffusers loaded from it."""
        raise NotImplementedError(f"{cls.name} declares no diffusers folder")

    def load_folder_model(self, model: nn.Module) -> None:
        """Takes the weights of ``model`` (loaded from a :attr:`diffusers_folder_class` folder) into the attached
        method."""
        raise NotImplementedError(f"{self.name} declares no diffusers folder")

    # -- tensors ---------------------------------------------------------------------------------------------
    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The trained parameters under their canonical names."""
        for name, (module, attr) in self.tensors.items():
            yield name, getattr(module, attr)

    def named_buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Persistent buffers of the modules and towers the method added (running statistics), canonical names."""
        for name, (module, attr) in self.buffers.items():
            yield name, getattr(module, attr)

    def named_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Everything a checkpoint of the method holds: trained parameters, then buffers."""
        yield from self.named_tensors()
        yield from self.named_buffers()

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, tensor in self.named_tensors():
            yield tensor

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    # -- helpers for subclasses ------------------------------------------------------------------------------
    def add_module(self, parent: nn.Module, canonical: str, module: nn.Module) -> nn.Module:
        """Registers a new trainable module under ``parent`` and its parameters under ``canonical``."""
        attr = f"vp_{self.key}_{len(self._added)}"
        module._vp_owned = True
        ref = next((p for p in parent.parameters()), None)
        if ref is not None:
            module.to(device=ref.device, dtype=ref.dtype)
        module.train(parent.training)
        parent.add_module(attr, module)
        self._added.append((parent, attr))
        self._register_module_tensors(canonical, module)
        return module

    def free_tower_name(self, name: str) -> str:
        """``name`` for a side tower, or, when another method's side tower holds it already (a second ControlNet),
        the first free of ``name_1``, ``name_2``, ...: diffusers' numbering of a ``MultiControlNetModel``'s folders."""
        root, number, free = self.backbone.model, 0, name
        while getattr(getattr(root, free, None), "_vp_owned", False):
            number += 1
            free = f"{name}_{number}"
        return free

    def add_tower(self, name: str, module: nn.Module) -> nn.Module:
        """Adds a side network (a ControlNet built from the U-Net, say) to the adapted model as attribute ``name``.

        ``.to()``, DDP and ``state_dict`` see it; its parameters train and, with its persistent buffers, are saved
        as ``<name>.<path>``; detach removes it. The module keeps its dtype and moves to the model's device.
        """
        root = self.backbone.model
        if hasattr(root, name):
            raise IncompatibleMethodError(f"{self.name} cannot add a tower '{name}': the model already has one")
        module._vp_owned = True
        ref = next((p for p in root.parameters()), None)
        if ref is not None:
            module.to(device=ref.device)
        module.train(root.training)
        root.add_module(name, module)
        self._added.append((root, name))
        self._register_module_tensors(name, module)
        return module

    def _register_module_tensors(self, canonical: str, module: nn.Module) -> None:
        for pname, _ in module.named_parameters():
            owner_path, _, attr = pname.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            self.tensors[f"{canonical}.{pname}"] = (owner, attr)
        for path, owner, attr in named_persistent_buffers(module):
            self.buffers[f"{canonical}.{path}"] = (owner, attr)

    def wrap(self, parent: nn.Module, attr: str, wrapper: nn.Module, canonical_of: Callable[[str], str]) -> None:
        """Replaces ``parent.attr`` by ``wrapper`` (which keeps the original as ``wrapper.base``)."""
        original = getattr(parent, attr)
        wrapper.train(original.training)
        setattr(parent, attr, wrapper)
        self._wrapped.append((parent, attr, original))
        for pname, _ in wrapper.named_parameters():
            if pname.startswith("base."):
                continue
            owner_path, _, pattr = pname.rpartition(".")
            self.tensors[canonical_of(pname)] = (wrapper.get_submodule(owner_path), pattr)
        for path, owner, battr in named_persistent_buffers(wrapper, skip="base"):
            self.buffers[canonical_of(path)] = (owner, battr)

    def train_in_place(self, name: str, owner: nn.Module, attr: str, keep_original: bool = True) -> None:
        """Marks a backbone parameter as trained by this method, keeping its original value for detach (unless
        ``keep_original`` is False: then detach leaves the trained value)."""
        canonical = f"base.{name}"
        if canonical in self.tensors:
            return
        self.tensors[canonical] = (owner, attr)
        if keep_original:
            self._originals[canonical] = getattr(owner, attr).detach().clone()

    def tower_parameters(self) -> Iterator[tuple[str, nn.Module, str]]:
        """The tower's own parameters, excluding the heads'."""
        head_ids = {id(p) for head in self.backbone.heads().values() for p in head.parameters()}
        for name, owner, attr in named_base_parameters(self.backbone.model):
            if self.tower.owns(name) and id(getattr(owner, attr)) not in head_ids:
                yield name, owner, attr

    def modules_by_path(
        self, spec: TargetSpec, kinds: tuple[type[nn.Module], ...] | None = None
    ) -> list[tuple[str, nn.Module, str, nn.Module]]:
        """The tower's library modules that ``spec`` (``target_modules``: path suffixes or one regex) selects, as
        ``(path, parent, attr, module)`` with paths relative to the adapted model; heads are never selected.

        Raises:
            ConfigError: Nothing selected (naming existing paths), or a selected module not of ``kinds``.
        """
        head_ids = {id(m) for head in self.backbone.heads().values() for m in head.modules()}
        candidates = [
            entry
            for entry in library_modules(self.backbone.model)
            if id(entry[3]) not in head_ids
            and any(self.tower.owns(f"{entry[0]}.{name}") for name, _ in entry[3].named_parameters())
        ]
        return find_modules(candidates, spec, f"{self.name} target_modules", kinds)

    def hook_output(self, module: nn.Module, fn: Callable, *args: Any, with_kwargs: bool = False) -> None:
        """Registers ``fn(*args, module, inputs, output)`` as a forward hook (kept picklable and copyable); with
        ``with_kwargs``, ``fn(*args, module, inputs, kwargs, output)``."""
        self._hooks.append(module.register_forward_hook(partial(fn, *args), with_kwargs=with_kwargs))

    def hook_input(self, module: nn.Module, fn: Callable, *args: Any, with_kwargs: bool = False) -> None:
        """Registers ``fn(*args, module, inputs)`` as a forward pre-hook; with ``with_kwargs``,
        ``fn(*args, module, inputs, kwargs)``, which returns None or new ``(inputs, kwargs)``."""
        self._hooks.append(module.register_forward_pre_hook(partial(fn, *args), with_kwargs=with_kwargs))

    def hook_tokens_input(self, module: nn.Module, fn: Callable, *args: Any) -> None:
        """Replaces the token sequence ``module`` receives first by ``fn(*args, tokens)``; ``tokens`` is
        (batch, tokens, dim) whatever the library's layout (open_clip may run sequence-first)."""
        self.hook_input(module, self._tokens_in, fn, args)

    def hook_tokens_output(self, module: nn.Module, fn: Callable, *args: Any) -> None:
        """Replaces the token output of ``module`` by ``fn(*args, inputs, output)``, both (batch, tokens, dim):
        ``inputs`` is the module's first input, ``output`` its output tensor (a tuple output keeps its rest)."""
        self.hook_output(module, self._tokens_out, fn, args)

    def hook_past_branch(
        self, branch: Branch, source: nn.Module, fn: Callable, *args: Any, drop_path: bool = False
    ) -> None:
        """Adds ``fn(*args, tokens)`` to what ``branch`` adds to the residual stream, past its layer scale and drop
        path (:attr:`Branch.residual`), ``tokens`` being the first input of ``source`` (batch, tokens, dim).

        ``drop_path``: the added value gets a drop-path mask of its own at the branch's rate (the official Convpass
        block, ``x + dp(f(x)) + dp(bypass(x)) * s``); otherwise none (AdaptFormer's adapter skips drop path).
        """
        seen: list[torch.Tensor] = []  # the latest input of source, taken by the residual hook of the same call
        self.hook_tokens_input(source, _remember, seen)
        target = branch.residual if branch.residual is not None else branch.module
        self.hook_tokens_output(target, self._add_past_branch, seen, target, drop_path, fn, args)

    @staticmethod
    def _add_past_branch(
        seen: list,
        target: nn.Module,
        drop_path: bool,
        fn: Callable,
        args: tuple,
        inputs: torch.Tensor,
        output: torch.Tensor,
    ) -> torch.Tensor:
        value = fn(*args, seen.pop())
        rate = getattr(target, "drop_prob", 0.0) if drop_path else 0.0
        if rate and target.training:
            from timm.layers import drop_path as sample_drop_path

            value = sample_drop_path(value, rate, True, getattr(target, "scale_by_keep", True))
        return output + value

    def _sequence_first(self) -> bool:
        layout = self.tower.tokens
        return layout is not None and not layout.batch_first

    def _tokens_in(self, fn: Callable, args: tuple, module: nn.Module, inputs: tuple) -> tuple:
        flip = self._sequence_first()
        x = inputs[0].transpose(0, 1) if flip else inputs[0]
        out = fn(*args, x)
        return (out.transpose(0, 1) if flip else out, *inputs[1:])

    def _tokens_out(self, fn: Callable, args: tuple, module: nn.Module, inputs: tuple, output: Any) -> Any:
        flip = self._sequence_first()
        x = inputs[0] if inputs else None
        y = branch_tensor(output)
        if flip:
            x, y = (x.transpose(0, 1) if x is not None else None), y.transpose(0, 1)
        out = fn(*args, x, y)
        return replace_branch_tensor(output, out.transpose(0, 1) if flip else out)

    def call_input(self, name: str) -> Any:
        """The per-call input ``name`` given by ``vp.conditioning`` (declared in :attr:`call_inputs`): one value for
        every method that reads it, or a dict method key -> value (a ControlNet on edges and a T2I-Adapter on
        depth in one call; two ControlNets: ``controlnet`` and ``controlnet_1``)."""
        if name not in self.call_inputs:
            raise ValueError(f"{self.name} reads the call input '{name}' without declaring it in call_inputs")
        try:
            value = self.backbone.call_inputs[name]
        except KeyError:
            raise ConfigError(
                f"{self.name} needs a per-call {name}; run the model inside vp.conditioning(model, {name}=...)"
            ) from None
        if isinstance(value, dict):
            if self.key not in value:
                raise ConfigError(
                    f"vp.conditioning's {name} names {', '.join(value)} but not {self.key}, which reads it"
                )
            return value[self.key]
        return value

    def blocks(self) -> list[Block]:
        return self.tower.blocks


_FOLDER_HOOKS = ("options_from_folder", "load_folder_model")


def folder_class_names(cls: type[Method]) -> tuple[str, ...]:
    """The diffusers classes of the folders ``cls`` reads back (:attr:`Method.diffusers_folder_class`)."""
    names = cls.diffusers_folder_class
    return () if names is None else (names,) if isinstance(names, str) else tuple(names)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator filing a method in ``METHODS`` under its own ``name`` (stated once, in the class), after
    checking what it declares.

    Raises:
        ValueError: No name; no config class of its own (another registered method's, or ``MethodConfig``);
            ``merges_exactly`` disagreeing with whether the class implements ``merge``; a diffusers folder class
            another method reads already, or one declared without ``options_from_folder`` / ``load_folder_model``.
    """
    if not cls.name:
        raise ValueError(f"method class {cls.__qualname__} has no name")
    config = cls.config_class
    if config is MethodConfig or not issubclass(config, MethodConfig):
        raise ValueError(f"method '{cls.name}' needs a MethodConfig subclass of its own as config_class")
    below = cls.__mro__[: cls.__mro__.index(Method)]  # the classes between cls and Method, cls included
    implements = {attr: any(attr in vars(klass) for klass in below) for attr in ("merge", *_FOLDER_HOOKS)}
    if cls.merges_exactly != implements["merge"]:
        raise ValueError(
            f"method '{cls.name}' declares merges_exactly={cls.merges_exactly} but "
            f"{'implements' if implements['merge'] else 'does not implement'} merge()"
        )
    folders = folder_class_names(cls)
    if folders and not all(implements[attr] for attr in _FOLDER_HOOKS):
        raise ValueError(f"method '{cls.name}' reads {', '.join(folders)} folders: implement {_FOLDER_HOOKS}")
    for other in METHODS.registered():
        if other.config_class is config:
            raise ValueError(f"methods '{other.name}' and '{cls.name}' share the config class {config.__name__}")
        shared = [name for name in folders if name in folder_class_names(other)]
        if shared:
            raise ValueError(
                f"methods '{other.name}' and '{cls.name}' both read {shared[0]} folders; "
                "set diffusers_folder_class = None on one"
            )
    return METHODS.register(cls.name)(cls)
