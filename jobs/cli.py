"""The ``copydet`` command line: a registry of sub-commands, each a small function.

Stage commands share one shape: ``copydet STAGE [CONFIG] [--out DIR] [--set KEY=VALUE ...]
[--address URL]``; they read and write the run folder, so any stage can run alone.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from core.logs import setup_logging
from jobs.config import ConfigError, PipelineConfig, load_config

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


def build_parser() -> argparse.ArgumentParser:
    import jobs.commands  # noqa: F401  (registers the commands)
    parser = argparse.ArgumentParser(prog="copydet", description="Image copy detection on Ray (ISC21 style).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS.values():
        p = sub.add_parser(c.name, help=c.help, description=c.help)
        if c.uses_config:
            p.add_argument("config", nargs="?", help="pipeline YAML (default: configs/smoke.yaml)")
            p.add_argument("--out", help="run folder (overrides `output`)")
            p.add_argument("--set", action="append", metavar="KEY=VALUE",
                           help="override a config key, e.g. --set search.k=20 (repeatable)")
            p.add_argument("--address", help="Ray cluster address (default: local Ray)")
        for flags, kwargs in c.arguments:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(_command=c)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return int(args._command.fn(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        log.error("copydet %s: error: %s", args.command, e)
        return 2


if __name__ == "__main__":
    # Commands register on the importable `jobs.cli`, not on this `__main__` copy.
    from jobs.cli import main as registered_main
    sys.exit(registered_main())
