"""The ``copydet`` command line: one sub-command per entry of :data:`jobs.commands.COMMANDS`.

Stage commands share one shape: ``copydet STAGE [CONFIG] [--out DIR] [--set KEY=VALUE ...]
[--address URL]``; they read and write the run folder, so any stage can run alone.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from ray.exceptions import AuthenticationError, RayTaskError

from core.logs import setup_logging
from jobs.commands import COMMANDS
from jobs.config import ConfigError
from jobs.runtime import Stopped
from jobs.stages import NAMES as STAGE_NAMES

# Errors that are the user's to fix, printed as one message (COPYDET_DEBUG=1 adds the traceback):
# OSError covers a missing file, no permission, a read-only or full disk; AuthenticationError, a
# cluster's Jobs API that refused the Ray token (README: Running on a Ray cluster).
USER_ERRORS = (ConfigError, OSError, ValueError, RuntimeError, AuthenticationError)

log = logging.getLogger(__name__)
# `copydet --help` lists the commands in the order a user meets them; one not named here comes last.
HELP_ORDER = ("run", *STAGE_NAMES, "evaluate", "report", "compare", "tune", "plan", "index", "serve", "models",
              "pretrain", "finetune", "train-verifier", "detector", "submit", "status", "logs", "stop")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="copydet", description="Image copy detection on Ray (ISC21 style).")
    parser.add_argument("--version", action="version", version=f"copydet {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in sorted(COMMANDS.values(), key=lambda c: HELP_ORDER.index(c.name) if c.name in HELP_ORDER else 99):
        p = sub.add_parser(c.name, help=c.help, description=c.help)
        if c.uses_config:
            p.add_argument("config", nargs="?", help="pipeline YAML (default: the --out run folder's config.yaml "
                           "if it has one, else configs/smoke.yaml)")
            p.add_argument("--out", help="run folder (overrides `output`)")
            p.add_argument("--set", action="append", metavar="KEY=VALUE",
                           help="override a config key, e.g. --set search.k=20 (repeatable)")
            if c.address:
                p.add_argument("--address", help=c.address)
        for flags, kwargs in c.arguments:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(_command=c)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if os.environ.get("COPYDET_DEBUG") else logging.INFO)
    try:
        return int(args._command.fn(args) or 0)
    except USER_ERRORS as e:
        log.error("copydet %s: error: %s", args.command, _message(e))
        log.debug("traceback", exc_info=True)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: every stage keeps its finished shards, skipped next time
        stopped = isinstance(e, Stopped)
        log.error("copydet %s: %s; what it finished is kept (run it again to go on)", args.command,
                  "stopped (SIGTERM)" if stopped else "interrupted")
        log.debug("traceback", exc_info=True)
        return 143 if stopped else 130


def _version() -> str:
    """The installed package's version; a source tree run without installing says so."""
    try:
        return version("copydet")
    except PackageNotFoundError:
        return "(not installed: run `bash .ci/install`)"


def _message(e: Exception) -> Exception | str:
    """What to print of ``e``: a Ray task's own exception, without the remote traceback Ray wraps it
    in; an OS error as ``path: what`` (``runs/x: Read-only file system``)."""
    cause = getattr(e, "cause", None) if isinstance(e, RayTaskError) else None
    e = cause if isinstance(cause, Exception) else e
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}" + (f" ({e.filename2})" if e.filename2 else "")
    return e


if __name__ == "__main__":
    sys.exit(main())
