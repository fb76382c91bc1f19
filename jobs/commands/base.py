"""The sub-command registry: ``@command(name, help, *args)`` registers ``fn(args)`` as ``copydet NAME``."""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from core.store import exists
from core.yamlconf import text_override
from jobs.config import PipelineConfig, load_config
from jobs.layout import RunDir

log = logging.getLogger(__name__)


@dataclass
class Command:
    name: str
    help: str
    fn: Callable[[argparse.Namespace], int | None]
    arguments: list[tuple[tuple[str, ...], dict]] = field(default_factory=list)
    uses_config: bool = True


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


def command(name: str, help: str, *arguments: tuple, uses_config: bool = True):
    """Register ``fn(args)`` as ``copydet NAME``."""
    def deco(fn):
        COMMANDS[name] = Command(name, help, fn, list(arguments), uses_config)
        return fn
    return deco


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The command's config: CONFIG, else the ``--out`` run folder's own ``config.yaml`` when it has
    one (a stage or evaluate run again on a finished run), else the default; ``--set`` on top."""
    overrides = list(args.set or [])
    path = args.config
    if getattr(args, "out", None):
        overrides.append(text_override("output", args.out))
        saved = RunDir(args.out).config
        if path is None and exists(saved):
            path = saved
            log.info(f"config: {saved} (the run folder's own; name a CONFIG to use another)")
    return load_config(path, overrides)
