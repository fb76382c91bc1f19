"""copydet's logging: status lines go through ``logging``; progress bars stay ``tqdm``.

:func:`setup_logging` gives the copydet packages one handler that writes with ``tqdm.write``,
so a log line printed while a bar is running appears above the bar instead of breaking it.
Command output proper (tables, job ids) is printed to stdout, not logged.
"""
from __future__ import annotations

import logging

from tqdm.auto import tqdm

PACKAGES = ("core", "pretrain", "patchers", "ensemble", "jobs")


class TqdmHandler(logging.StreamHandler):
    """A stream handler that keeps tqdm's progress bars intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's own convention: never raise from a handler
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Send the copydet packages' records at ``level`` and above to stderr (idempotent)."""
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, TqdmHandler)] + [handler]
        logger.setLevel(level)
        logger.propagate = False
