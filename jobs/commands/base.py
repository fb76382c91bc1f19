"""The sub-command registry: ``@command(name, help, *args)`` registers ``fn(args)`` as ``copydet NAME``."""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from core.store import exists
from core.yamlconf import with_output
from jobs.config import DEFAULT_CONFIG, PipelineConfig, load_config
from jobs.layout import RunDir

log = logging.getLogger(__name__)


CommandFn = Callable[[argparse.Namespace], "int | None"]  # a command's body: its exit status (None: 0)


@dataclass
class Command:
    name: str
    help: str
    fn: CommandFn
    arguments: list[tuple[tuple[str, ...], dict]] = field(default_factory=list)
    uses_config: bool = True
    address: str | None = None  # the help of its --address (with uses_config); None: it starts no Ray


COMMANDS: dict[str, Command] = {}


def arg(*flags: str, **kwargs) -> tuple[tuple[str, ...], dict]:
    return flags, kwargs


def positive_int(text: str) -> int:
    """argparse type of a count: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def count_or_folder(text: str) -> int | str:
    """argparse type of an image count that may be given as the images' folder instead (counted)."""
    if text.strip().lstrip("+-").isdigit():
        return positive_int(text)
    if os.path.isdir(text):
        return text
    raise argparse.ArgumentTypeError(f"expected a number of images or a folder, got {text!r} (not a folder)")


LOCAL_RAY = "Ray cluster address (default: the config's ray.address, else an embedded local Ray)"


def command(name: str, help: str, *arguments: tuple, uses_config: bool = True,
            address: str | None = LOCAL_RAY) -> Callable[[CommandFn], CommandFn]:
    """Register ``fn(args)`` as ``copydet NAME``; a config command takes CONFIG, --out, --set and,
    unless ``address`` is None, --address (``address``: its help)."""
    def deco(fn: CommandFn) -> CommandFn:
        COMMANDS[name] = Command(name, help, fn, list(arguments), uses_config, address)
        return fn
    return deco


def config_path(args: argparse.Namespace) -> str:
    """CONFIG, else the ``--out`` run folder's own ``config.yaml`` when it has one (a stage or
    evaluate run again on a finished run), else the default config."""
    if args.config is None and getattr(args, "out", None) and exists(RunDir(args.out).config):
        log.info(f"config: {RunDir(args.out).config} (the run folder's own; name a CONFIG to use another)")
        return RunDir(args.out).config
    return args.config or str(DEFAULT_CONFIG)


def config_from_args(args: argparse.Namespace, sets: list[str] | None = None) -> PipelineConfig:
    """The command's config (:func:`config_path`), ``--out`` and ``sets`` (default: ``--set``) on top."""
    sets = (args.set or []) if sets is None else sets
    return load_config(config_path(args), with_output(sets, getattr(args, "out", None)))
