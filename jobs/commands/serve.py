"""``copydet serve INDEX_DIR``: the query service on Ray Serve until Ctrl-C (or SIGTERM)."""
from __future__ import annotations

import argparse
import logging
import signal
import threading

from ensemble.index.layout import IndexDir
from jobs.commands.base import LOCAL_RAY, arg, command
from jobs.runtime import init_ray

log = logging.getLogger(__name__)


@command("serve", "serve an index over HTTP (Ray Serve): POST /v1/match, the match page at /, docs at /docs",
         arg("index_dir", help="index folder made by `copydet index build`"),
         arg("--set", action="append", metavar="KEY=VALUE",
             help="override serve.* / index.* / ray.* keys of the index's config, e.g. --set serve.port=8080"),
         arg("--address", help=LOCAL_RAY),
         uses_config=False)
def serve_index(args: argparse.Namespace) -> None:
    IndexDir(args.index_dir).require_current()  # not an index: refused before the imports below take seconds
    from jobs.indexing import index_config
    from jobs.serve.app import start, stop

    overrides = list(args.set or [])
    version, cfg = index_config(args.index_dir, None, overrides)
    init_ray(cfg.ray, args.address)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())  # before start: a stop while starting is clean too
    try:
        url = start(args.index_dir, cfg, overrides)
        log.info(f"serving {args.index_dir} (version {version}) at {url}  (page: {url}/, API docs: {url}/docs)")
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        log.info("serve: stopping; requests in flight are answered first")
        stop()
