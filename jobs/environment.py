"""What a run was made with: ``RUN/environment.json`` gets one record per command that ran stages
there (when, which stages, package versions, the Ray cluster's resources), so that a run's
timings and scores can be compared with another machine's, and a resumed run shows each part."""
from __future__ import annotations

import json
import logging
import platform
import socket
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

import ray

from core.store import exists, read_text, write_text
from jobs.layout import RunDir

log = logging.getLogger(__name__)

PACKAGES = ("copydet", "torch", "timm", "faiss-cpu", "faiss-gpu", "ray", "numpy", "pyarrow", "scikit-learn",
            "opencv-python", "ultralytics", "lightly", "augly")
SHOWN = ("copydet", "torch", "faiss-cpu", "faiss-gpu", "ray")  # in the report's one line


def installed() -> dict[str, str]:
    """Version of each of :data:`PACKAGES` that is installed here (the driver's)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def cluster() -> dict[str, float | int]:
    """The connected Ray cluster: alive nodes, CPUs, GPUs and accelerator types (e.g. ``H100``)."""
    res = ray.cluster_resources()
    kinds = sorted(k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:"))
    return {"nodes": sum(n["Alive"] for n in ray.nodes()), "CPU": res.get("CPU", 0), "GPU": res.get("GPU", 0),
            **({"accelerators": kinds} if kinds else {})}


def describe(stages: Sequence[str]) -> dict:
    """This command's record; call with Ray connected."""
    return {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "stages": list(stages),
            "host": socket.gethostname(), "python": platform.python_version(), "platform": platform.platform(),
            "packages": installed(), "ray_cluster": cluster()}


def read_records(run: RunDir) -> list[dict]:
    """The run's records, oldest first; a file that is not a JSON list is named and set aside."""
    if not exists(run.environment):
        return []
    try:
        records = json.loads(read_text(run.environment))
    except ValueError as e:
        log.warning(f"{run.environment}: not JSON ({e}); starting a new list")
        return []
    if not isinstance(records, list):
        log.warning(f"{run.environment}: not a list of records; starting a new list")
        return []
    return records


def record(run: RunDir, stages: Sequence[str], reused_from: str | None = None) -> dict:
    """Append this command's record to ``RUN/environment.json`` (written whole, atomically);
    ``reused_from``: the run folder whose shards this command started from (``run --reuse``)."""
    rec = {**describe(stages), **({"reused_from": reused_from} if reused_from else {})}
    write_text(run.environment, json.dumps([*read_records(run), rec], indent=2))
    return rec


def summary(run: RunDir) -> str | None:
    """One line for the report: the last command's packages and cluster, and how many commands made the run."""
    records = read_records(run)
    if not records:
        return None
    last = records[-1]
    pkgs = ", ".join(f"{n} {v}" for n, v in last.get("packages", {}).items() if n in SHOWN)
    c = last.get("ray_cluster", {})
    kinds = f" ({', '.join(c['accelerators'])})" if c.get("accelerators") else ""
    where = f"{c.get('nodes', '?')} node(s), {c.get('CPU', 0):g} CPUs, {c.get('GPU', 0):g} GPUs{kinds}"
    more = f"; {len(records)} commands made this run (environment.json)" if len(records) > 1 else ""
    lent = sorted({r["reused_from"] for r in records if r.get("reused_from")})
    more += f"; reference and train shards from {', '.join(lent)}" if lent else ""
    return f"made with {pkgs} on {where}, {last.get('started', '?')}{more}"
