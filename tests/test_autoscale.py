"""GPUs from the config, not from the cluster's current state: on an autoscaling cluster whose
head has no GPU and whose GPU worker type has ``min_workers: 0``, the extract stage asks for
GPU actors, the autoscaler starts a GPU-typed worker, and the model actors run there.

Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1``: worker nodes are local raylets with the
configured resources) plays the cloud; there is no CUDA behind its fake GPU, so the actor logs
that it falls back to the CPU: what is tested is the scheduling.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import yaml

from core.store import read_table
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600  # a hang guard: under load the driver took ~210 s
DRIVER = """
import json, sys
import ray
from core.logs import setup_logging
from jobs.config import load_config
from jobs.pipeline import run_stages
address, config, out = sys.argv[1:4]
setup_logging()
ray.init(address=address, logging_level="ERROR")
cfg = load_config(config, [f"output={out}"])
run_stages(cfg, ["manifest", "patch", "extract"], address=address)
from ray.util.state import list_actors
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
actors = [(a.class_name, a.node_id) for a in list_actors(address=address, limit=1000)]  # not "auto": may find another Ray
print("RESULT " + json.dumps({"nodes": nodes, "actors": actors}), flush=True)
"""


def fake_cluster_config(port: int) -> dict:
    """A CPU-only head (1 CPU) and one GPU worker type that starts with no node."""
    return {
        "cluster_name": "copydet-fake", "max_workers": 1, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1, "GPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 1.0, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
    }


def kill_processes_of(tag: str) -> None:
    """Every process whose command line mentions ``tag`` (this cluster's temp dir); never
    ``ray stop``, which would kill every Ray on the machine."""
    procs = [p for p in psutil.process_iter(["cmdline"])
             if p.pid != os.getpid() and any(tag in (c or "") for c in p.info["cmdline"] or [])]
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture
def autoscaling_cluster():
    """``(address, env, autoscaling config path)`` of a fresh fake autoscaling cluster."""
    tmp = tempfile.mkdtemp(prefix="cdas-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    config = Path(tmp, "cluster.yaml")
    config.write_text(yaml.safe_dump(fake_cluster_config(port)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled",
           "COPYDET_AUTOSCALING_CONFIG": str(config), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)  # the session's own local Ray must not be joined
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_bin, "start", "--head", f"--autoscaling-config={config}", "--num-cpus=1", "--num-gpus=0",
                    f"--port={port}", f"--temp-dir={tmp}/ray", "--include-dashboard=true",
                    f"--dashboard-port={free_port()}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}", env, config
    finally:
        kill_processes_of(f"{tmp}/ray")
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_extract_makes_the_autoscaler_start_gpu_workers(autoscaling_cluster, tiny_dataset, tmp_path):
    address, env, _ = autoscaling_cluster
    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    raw.update(data={"root": str(tiny_dataset)}, models=[{"name": "tiny_cnn", "scales": [32], "batch_size": 8}],
               extract={"use_gpu": "auto", "cpus_per_actor": 0.25, "chunk_patches": 8})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", DRIVER, address, str(config), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    gpu_nodes = {n for n, res in result["nodes"].items() if res.get("GPU", 0) >= 1}
    assert gpu_nodes, f"the autoscaler started no GPU worker: {result['nodes']}"
    embedders = [node for name, node in result["actors"] if "ChunkEmbedder" in name]
    assert embedders and set(embedders) <= gpu_nodes  # every model actor ran on a GPU node
    assert "torch sees none; this actor runs on the CPU" in proc.stdout + proc.stderr
    patches, feats = read_table(out / "patches.parquet"), read_table(out / "features" / "tiny_cnn@32")
    assert feats.num_rows == patches.num_rows > 0
