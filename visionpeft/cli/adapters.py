"""Adapter arithmetic on saved adapter folders:

    visionpeft adapters combine A B [C ...] --weights 0.7 0.3 --type svd --svd-rank 8 --out AB
    visionpeft adapters resize A (--rank 4 | --energy 0.9 [--rank 8]) --out A4
    visionpeft adapters extract --base BASE --tuned TUNED --rank 8 --out LORA [--format kohya]
    visionpeft adapters inspect A

(``python tools/adapters.py`` is the same command.) combine: PEFT's ``add_weighted_adapter`` on visionpeft folders
of one base (types linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune and the *_svd ones). resize:
sd-scripts' resize_lora (SVD to a rank, or the rank keeping a fraction of the energy). extract: sd-scripts'
extract_lora_from_models (a LoRA of the difference of a fine-tuned model to its base; both a diffusers pipeline or
model folder or hub id, or TUNED a .safetensors state dict of the fine-tuned BASE model, e.g. from
vp.export_merged). resize and extract print each layer's rank and relative error. inspect: methods, ranks, targets,
counts and the base weights of a folder. --out is a new or empty folder: nothing is written over, and nothing at all
on an error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_base_check_argument, positive_int

COMBINATION_TYPES = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)  # the keys of visionpeft.arithmetic.combine.COMBINATIONS (tested), listed here so --help loads no torch


def _fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionpeft adapters", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{combine,resize,extract,inspect}")
    combine = commands.add_parser("combine", help="a weighted combination of adapters of one base (PEFT's types)")
    combine.add_argument("adapters", nargs="+", type=Path, help="visionpeft adapter folders")
    combine.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter")
    combine.add_argument("--type", dest="combination_type", required=True, choices=COMBINATION_TYPES)
    combine.add_argument("--svd-rank", type=positive_int, help="the rank of an *svd combination (required there)")
    combine.add_argument("--svd-clamp", type=_fraction, help="clamp the SVD factors at this quantile")
    combine.add_argument("--density", type=_fraction, help="fraction kept by ties / dare_* / magnitude_prune")
    combine.add_argument("--majority-sign-method", choices=("total", "frequency"), default="total")
    combine.add_argument("--seed", type=int, default=0, help="the seed of DARE's random masks (default 0)")
    combine.add_argument("--heads-from", type=int, help="keep the task heads of this adapter (0-based)")
    combine.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    add_base_check_argument(combine)
    resize = commands.add_parser("resize", help="a LoRA truncated by SVD to a rank or a kept fraction of energy")
    resize.add_argument("adapter", type=Path, help="a visionpeft adapter folder")
    resize.add_argument("--rank", type=positive_int, help="the new rank (with --energy: the largest allowed)")
    resize.add_argument("--energy", type=_fraction, help="keep this fraction of each update's energy (sd-scripts)")
    resize.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    extract = commands.add_parser("extract", help="a LoRA of a fine-tuned model's difference to its base")
    extract.add_argument("--base", required=True, help="the base: a diffusers pipeline / model folder, or a hub id")
    extract.add_argument("--tuned", required=True, help="the fine-tuned model: as --base, or a .safetensors state dict")
    extract.add_argument("--rank", type=positive_int, required=True, help="the LoRA rank")
    extract.add_argument("--conv-rank", type=positive_int, help="the rank of convolutions larger than 1x1")
    extract.add_argument("--target-modules", nargs="+", help="only these layers (module-path suffixes)")
    extract.add_argument("--clamp-quantile", type=_fraction, help="clamp the factors (sd-scripts: 0.99)")
    extract.add_argument("--min-diff", type=float, default=0.0, help="leave out layers differing by at most this")
    extract.add_argument("--format", choices=("visionpeft", "peft", "diffusers", "kohya"), default="visionpeft")
    extract.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    inspect = commands.add_parser("inspect", help="what a saved adapter folder holds")
    inspect.add_argument("adapter", type=Path, help="a visionpeft adapter folder")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from ..errors import ConfigError
    from ..io import kind_problem

    for folder in getattr(args, "adapters", None) or [getattr(args, "adapter", None)]:
        if folder is not None and kind_problem(folder, "folder"):
            raise ConfigError(f"adapter {folder} {kind_problem(folder, 'folder')}")
    if args.command == "inspect":
        from ..arithmetic import describe_adapter

        print("\n".join(describe_adapter(args.adapter)))
        return 0
    from ..arithmetic.records import check_output

    check_output(args.out, list(getattr(args, "adapters", None) or [getattr(args, "adapter", None)]))
    result = _run(args)
    for line in result.summary():
        print(line)
    print(f"wrote {result.output}")
    return 0


def _run(args):
    """The arithmetic the command asks for, its result written to ``--out``."""
    from .. import arithmetic

    if args.command == "combine":
        options = {k: getattr(args, k) for k in ("svd_rank", "svd_clamp", "density", "majority_sign_method", "seed")}
        return arithmetic.combine_adapters(
            [str(a) for a in args.adapters],
            args.weights,
            args.combination_type,
            args.out,
            heads_from=args.heads_from,
            check_base=not args.ignore_base_mismatch,
            **options,
        )
    if args.command == "resize":
        return arithmetic.resize_lora(str(args.adapter), rank=args.rank, energy=args.energy, output=args.out)
    base = load_model(args.base)
    tuned = load_model(args.tuned, base)
    return arithmetic.extract_lora(
        tuned,
        base,
        args.rank,
        args.out,
        args.format,
        conv_rank=args.conv_rank,
        target_modules=args.target_modules,
        clamp_quantile=args.clamp_quantile,
        min_diff=args.min_diff,
    )


def load_model(source: str, base=None):
    """A model for ``extract``: a diffusers pipeline folder or hub id, a diffusers model folder (``config.json``
    naming its class), or (``base`` given) a ``.safetensors`` state dict loaded into a copy of ``base``."""
    import copy
    import json

    from ..backbones.diffusers_loading import load_pipeline
    from ..errors import ConfigError

    path = Path(source).expanduser()
    if path.suffix == ".safetensors":
        if base is None:
            raise ConfigError(f"--base {source} is a weights file; give the base as a model folder or hub id")
        from ..backbones.weights_files import load_state, read_state_dict

        if not hasattr(base, "load_state_dict"):
            raise ConfigError("a .safetensors --tuned applies to a single model --base, not to a pipeline")
        model = copy.deepcopy(base)
        load_state(model, read_state_dict(path), path)
        return model
    config = path / "config.json"
    if path.is_dir() and not (path / "model_index.json").is_file() and config.is_file():
        import diffusers

        name = json.loads(config.read_text()).get("_class_name")
        if not isinstance(name, str) or not hasattr(diffusers, name):
            raise ConfigError(f"{config} names no diffusers model class (_class_name={name!r})")
        return getattr(diffusers, name).from_pretrained(path)
    return load_pipeline(source)
