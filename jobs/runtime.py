"""Ray start-up and the small helpers every stage runner shares."""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
import yaml
from ray.util import ActorPool
from tqdm.auto import tqdm

from core.logs import last_line, quiet_workers
from core.models.registry import default_registry_dir
from jobs.config import RayConfig
from patchers.detector.predict import ULTRALYTICS_ENV

# Devices are offline: hub look-ups must fail at once instead of retrying for a minute; ultralytics
# never installs packages and unpickles weights only (patchers.detector.predict).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **ULTRALYTICS_ENV}
CONNECT_TIMEOUT_S = 10.0  # a cluster address's first TCP connection
TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"
BAR_DELAY = 1e-6  # a progress bar of on_workers' results is drawn from its first update: after Ray's start-up lines

log = logging.getLogger(__name__)


class WorkerFailed(RuntimeError):
    """A Ray actor of :func:`on_workers` failed; the message is its cause in one line (Ray's traceback is above)."""


class Stopped(KeyboardInterrupt):
    """SIGTERM (a scheduler, a container's stop, `copydet stop`): the command ends as after Ctrl-C."""


def _stopped(signum: int, frame: object) -> None:
    raise Stopped


def target_address(cfg: RayConfig, address: str | None = None) -> str | None:
    """The Ray cluster to use: the one given, the config's, else $RAY_ADDRESS; None: copydet's own
    embedded Ray. A Jobs API address (``http://HEAD:8265``, what the job commands take) is refused,
    and so is one where nothing answers."""
    found = address or cfg.address or os.environ.get("RAY_ADDRESS") or None
    if not found:
        return None
    where = "--address" if address else "ray.address" if cfg.address else "$RAY_ADDRESS"
    if found.startswith(("http://", "https://")):
        raise ValueError(f"{where} {found} is a cluster's Jobs API, which `copydet submit`, `status`, `logs` and "
                         "`stop` use; to run this command there, `copydet submit` it, or give the head's "
                         "HOST:6379 from a machine of the cluster (ray://HOST:10001 for serve); to run it on this "
                         "machine, unset RAY_ADDRESS")
    check_answers(found, where)
    return found


def check_answers(address: str, where: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse a ``HOST:PORT`` or ``ray://HOST:PORT`` address that takes no connection, at once:
    ray.init would retry it for minutes, printing only warnings. Other forms (``auto``) are Ray's."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"{where} {address}: no Ray cluster answers there ({e.strerror or e}); check the "
                              "address, or start the cluster (`ray start --head`)") from None


def init_ray(cfg: RayConfig, address: str | None = None) -> None:
    """Connect to ``address`` (or the config's), or start an embedded local Ray."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    # A submitted job's working dir can be swapped out under the driver once Ray starts: pin
    # the default registry (./models) to an absolute path while the cwd still exists.
    os.environ.setdefault("COPYDET_REGISTRY", str(default_registry_dir()))
    # copydet draws its own progress bars (shards / patches per stage).
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    # An embedded Ray turns token authentication on and says so as a WARNING, every command's first line.
    logging.getLogger(TOKEN_SETUP_LOGGER).setLevel(logging.ERROR)
    if not ray.is_initialized():
        address = target_address(cfg, address)
        log.info(f"ray: connecting to {address}" if address else
                 f"ray: starting a local Ray, num_cpus={cfg.num_cpus or os.cpu_count()}")  # seconds of silence else
        try:  # "local": ray.init() alone would join a `ray start` cluster of this machine
            ray.init(address=address or "local", num_cpus=None if address else cfg.num_cpus,
                     include_dashboard=False, logging_level="WARNING", log_to_driver=True,
                     runtime_env={"env_vars": OFFLINE_ENV,  # by name: Ray Client sends these as JSON
                                  "worker_process_setup_hook": f"{quiet_workers.__module__}.{quiet_workers.__name__}"})
        except ConnectionError as e:  # Ray says why (e.g. no token) only in the warnings above it
            if os.environ.get("RAY_AUTH_MODE") == "token":
                raise
            raise ConnectionError(f"{e} (a cluster with token authentication answers only a client with "
                                  "RAY_AUTH_MODE=token and its token: README, Running on a Ray cluster)") from None
        if threading.current_thread() is threading.main_thread():  # Ray's core worker's handler aborts (exit 134)
            signal.signal(signal.SIGTERM, _stopped)
    ray.data.DataContext.get_current().enable_progress_bars = False


AUTOSCALING_CONFIGS = ("$COPYDET_AUTOSCALING_CONFIG", "~/ray_bootstrap_config.yaml")  # the head's copy of cluster.yaml


def autoscaler_gpus() -> float:
    """GPUs the cluster's autoscaler can add: its node types' ``GPU`` x ``max_workers``, from the
    config Ray's v2 autoscaler publishes, else the cluster launcher's copy on the head node."""
    try:
        from ray._private.state import state  # private API: ray is pinned (<2.61) in pyproject.toml

        published = state.get_max_resources_from_cluster_config()
    except Exception:  # not connected to a cluster with a published config
        published = None
    if published:
        return float(published.get("GPU", 0))
    for path in (os.path.expanduser(os.path.expandvars(p)) for p in AUTOSCALING_CONFIGS):
        if path and os.path.isfile(path):
            with open(path) as f:
                types = (yaml.safe_load(f) or {}).get("available_node_types", {})
            return float(sum(t.get("resources", {}).get("GPU", 0) * t.get("max_workers", 0) for t in types.values()))
    return 0.0


def gpus_possible() -> float:
    """GPUs the cluster has now or can have (``extract.use_gpu: auto`` uses GPUs when > 0)."""
    return max(float(ray.cluster_resources().get("GPU", 0)), autoscaler_gpus())


def require_gpus(asked: float, setting: str) -> None:
    """Refuse work that asks for GPUs (``setting`` names where) on a cluster that has none and
    cannot add any: Ray would keep it waiting for them, silently, for ever."""
    if asked and not gpus_possible():
        raise RuntimeError(f"{setting} is {asked:g} but the Ray cluster has no GPUs and cannot add any "
                           f"(set it to 0 to run on the CPU)")


def run_tasks(fn: Callable[..., Any], calls: Sequence[tuple], desc: str,
              options: dict | None = None) -> list[Any]:
    """Run ``fn(*args)`` as Ray tasks for each args tuple, with a progress bar of finished
    tasks; results in completion order. Tasks are retried by Ray if a worker dies."""
    if not calls:
        return []
    remote = ray.remote(fn).options(max_retries=3, retry_exceptions=False, **(options or {}))
    pending = [remote.remote(*args) for args in calls]
    results = []
    with tqdm(total=len(pending), desc=desc, unit="shard") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            if pending:  # and all finished meanwhile: a wait scans every pending ref, so one per burst, not per task
                more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
                done += more
            results.extend(ray.get(done))
            bar.update(len(done))
    return results


def on_workers(cls: type, args: tuple, method: str, items: Sequence[tuple], count: int, resources: dict[str, float],
               cfg: RayConfig, address: str | None = None, gpus_setting: str = "num_gpus",
               **local: Any) -> Iterator[Any]:
    """``cls(*args).<method>(*item)`` for each of ``items`` on ``count`` workers, each built once.
    One worker runs in this process (no Ray; ``local`` keyword arguments, e.g. a progress callback,
    go to its calls) unless a cluster is named (``address``, ``ray.address``; not ``$RAY_ADDRESS``
    alone: often the Jobs API's, set for submit); more are Ray actors with ``resources`` (GPUs the
    cluster cannot give are refused, naming ``gpus_setting``). Results come as they finish; a method
    re-run must be harmless (a restarted actor retries it). A failed actor raises :class:`WorkerFailed`."""
    if not items:
        return
    count = min(count, len(items))
    if count <= 1 and not (address or cfg.address):
        worker = cls(*args)
        for item in items:
            yield getattr(worker, method)(*item, **local)
        return
    init_ray(cfg, address)
    require_gpus(resources.get("num_gpus", 0), gpus_setting)
    actor = ray.remote(cls).options(**resources, max_restarts=3, max_task_retries=3)
    pool = ActorPool([actor.remote(*args) for _ in range(count)])
    try:
        yield from pool.map_unordered(lambda a, item: getattr(a, method).remote(*item), items)
    except ray.exceptions.RayError as e:
        raise WorkerFailed(last_line(e)[-300:]) from None
