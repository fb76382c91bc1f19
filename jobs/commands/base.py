"""The sub-command registry: ``@command(name, help, *args)`` registers ``fn(args)`` as ``copydet NAME``."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

from jobs.config import PipelineConfig, load_config


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


def command(name: str, help: str, *arguments: tuple, uses_config: bool = True):
    """Register ``fn(args)`` as ``copydet NAME``."""
    def deco(fn):
        COMMANDS[name] = Command(name, help, fn, list(arguments), uses_config)
        return fn
    return deco


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    overrides = list(args.set or [])
    if getattr(args, "out", None):
        overrides.append(f"output={args.out}")
    return load_config(args.config, overrides)
