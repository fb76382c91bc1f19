"""copydet's logging: status lines go through ``logging``; progress bars stay ``tqdm``.

:func:`setup_logging` gives the copydet packages one handler that writes with ``tqdm.write``,
so a log line printed while a bar is running appears above the bar instead of breaking it.
Command output proper (tables, job ids) is printed to stdout, not logged.
"""
from __future__ import annotations

import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

PACKAGES = ("core", "pretrain", "patchers", "ensemble", "jobs")
# Ray Train's placement-group cleaner polls the state API, which needs the dashboard that copydet
# does not start: it would warn of that every few seconds of a training run (../shared/DEPS.md).
QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


class TqdmHandler(logging.StreamHandler):
    """A stream handler that keeps tqdm's progress bars intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's own convention: never raise from a handler
            self.handleError(record)


class ProgressLines:
    """Progress of a long loop as lines, not a bar, for Ray workers (a bar's carriage returns garble
    the driver's output): :meth:`tick` prints ``what done/total, N min left`` at most every
    ``every_s`` seconds, and nothing when not ``enabled`` (ranks other than 0). ``start``: what
    was done before (a resumed loop), left out of the rate."""

    def __init__(self, what: str, total: int, every_s: float = 60.0, enabled: bool = True, start: int = 0) -> None:
        self.what, self.total, self.every_s, self.enabled, self.start = what, total, every_s, enabled, start
        self.started = self.last = time.perf_counter()

    def tick(self, done: int, extra: str = "") -> None:
        """``done`` of ``total`` are finished; ``extra`` (e.g. ``", loss 0.4"``) follows the count."""
        now = time.perf_counter()
        if not self.enabled or now - self.last < self.every_s or done <= self.start:
            return
        self.last = now
        left = (now - self.started) / (done - self.start) * (self.total - done)
        print(f"{self.what} {done}/{self.total}{extra}, {left / 60:.1f} min left", flush=True)


def last_line(e: BaseException) -> str:
    """The last non-empty line of ``e``'s message, where Ray and TorchScript put the cause after
    their tracebacks; the exception's type name when it has no message."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def setup_logging(level: int = logging.INFO) -> None:
    """Send the copydet packages' records at ``level`` and above to stderr (idempotent)."""
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, TqdmHandler)] + [handler]
        logger.setLevel(level)
        logger.propagate = False


class RunLog(logging.FileHandler):
    """Appends records, timestamped, to a folder's log file. The file is opened, and a header naming
    the command written, with the first record: a command refused before it logged leaves no file
    (nor the folder, made then)."""

    def __init__(self, path: str) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def _open(self):  # noqa: ANN202 (logging's own signature)
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        stream = super()._open()
        stream.write(f"--- pid {os.getpid()} on {socket.gethostname()}: {shlex.join(sys.argv)}\n")
        return stream


@contextmanager
def log_to(path: str) -> Iterator[None]:
    """Also append the copydet packages' records to ``path`` (a local file) for the block, and the error
    that ends it once it has logged; nested blocks on one path log once. A URI gets no file."""
    loggers = [logging.getLogger(name) for name in PACKAGES]
    if "://" in path or any(isinstance(h, RunLog) and h.baseFilename == os.path.abspath(path)
                            for h in loggers[0].handlers):
        yield
        return
    handler = RunLog(path)
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    except BaseException as e:
        if handler.stream is not None:  # refused before it logged: no file, as a lock leaves no folder
            handler.handle(logging.makeLogRecord({"levelno": logging.ERROR, "levelname": "ERROR",
                                                  "msg": f"ended by {type(e).__name__}: {e}"}))
        raise
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


def quiet_workers() -> None:
    """Ray's ``worker_process_setup_hook``, run by every new worker process before its first task:
    errors only from :data:`QUIET_LOGGERS`. It lives here, not in ``jobs``, so that importing it
    stays cheap (most of ``jobs`` pulls in timm and torch: seconds per actor)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
