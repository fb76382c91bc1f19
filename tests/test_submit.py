"""copydet submit: the job spec (no cluster), then a 3-node Ray cluster on this machine.

The cluster test runs a real ``ray.cluster_utils.Cluster`` (head + 2 workers with their own
custom resources) in a child process, next to the in-process ``ray_local`` used for the local
baseline run; it is never registered as the machine's default Ray address, so other tests'
``ray.init`` cannot attach to it by accident.
"""
import contextlib
import os
import re
import select
import shlex
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow.compute as pc
import pytest
import yaml
from ray.util.state import list_nodes

from core.metrics import read_predictions
from core.store import read_table
from jobs.cli import main
from jobs.config import ConfigError, load_config
from jobs.submit import (
    CLI_MAIN,
    EXCLUDES,
    check_locations,
    client,
    job_logs,
    job_spec,
    job_status,
    staged_config,
    submit,
)
from tests.test_faults import assert_complete

TIMEOUT_S = 600  # every wait on the cluster or a job: a hang guard (a loaded 2-core machine took 145 s)
JOB_SETS = ["models=[{name: tiny_cnn, scales: [64], batch_size: 4}]", "patches.shard_size=3",
            "search.k=5", "search.shard_size=7", "fuse.k=3"]


def write_config(tmp_path: Path, data: Path, out: Path, name: str = "job.yaml") -> Path:
    raw = yaml.safe_load((Path(__file__).parent.parent / "configs" / "smoke.yaml").read_text())
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**raw, "name": name, "data": {"root": str(data)}, "output": str(out)}))
    return path


# -- no cluster --------------------------------------------------------------------------


class FakeClient:
    def __init__(self, address):
        self.address, self.calls = address, []

    def submit_job(self, **kw):
        rel = kw["runtime_env"]["working_dir"] + "/" + shlex.split(kw["entrypoint"])[4]
        self.calls.append({**kw, "staged_exists": os.path.isfile(rel)})
        return "raysubmit_123"


def test_submit_builds_the_job_and_stages_an_outside_config(tmp_path, tiny_dataset):
    cfg_path = write_config(tmp_path, tiny_dataset, tmp_path / "out")
    made = []
    job = submit(str(cfg_path), "http://head:8265", "extract", ["search.k=3"], None,
                 client_factory=lambda a: made.append(FakeClient(a)) or made[-1], warn=lambda s: None)
    assert job == "raysubmit_123" and made[0].address == "http://head:8265"
    call = made[0].calls[0]
    argv = shlex.split(call["entrypoint"])
    assert argv[:3] == ["python", "-c", CLI_MAIN] and argv[3] == "extract"
    assert argv[4].startswith(".submit/") and argv[4].endswith("job.yaml")
    assert argv[5:] == ["--address", "auto", "--set", "search.k=3"]
    assert call["staged_exists"], "the config must be inside the working dir while it is uploaded"
    assert not (Path(call["runtime_env"]["working_dir"]) / argv[4]).exists(), "staged copy is removed"
    env = call["runtime_env"]
    assert set(EXCLUDES) >= {"/.venv", "/runs", "/models", "/.git"} and env["excludes"] == EXCLUDES
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"


def test_an_outside_config_is_staged_with_what_it_extends_merged_in(tmp_path):
    """Only the staged copy is uploaded: the config it extends, beside it outside the repo, is not."""
    root = Path(__file__).parent.parent
    (tmp_path / "base.yaml").write_text((root / "configs" / "smoke.yaml").read_text())
    (tmp_path / "my.yaml").write_text("extends: base.yaml\nsearch:\n  k: 5\n")
    with staged_config(str(tmp_path / "my.yaml")) as rel:
        staged = load_config(root / rel)
    assert staged.search.k == 5 and staged == load_config(tmp_path / "my.yaml")


def test_config_inside_the_repo_is_passed_by_relative_path():
    root = Path(__file__).parent.parent
    with staged_config(str(root / "configs" / "smoke.yaml")) as rel:
        assert rel == "configs/smoke.yaml"
    spec = job_spec(rel, "run", ["a.b=1 2"], "/shared/out", reuse="/shared/phase 1")
    assert CLI_MAIN in spec.entrypoint and spec.entrypoint.endswith("run configs/smoke.yaml --address auto "
                                                                    "--set 'a.b=1 2' --out /shared/out "
                                                                    "--reuse '/shared/phase 1'")


def test_relative_output_is_refused_and_relative_data_warned():
    with pytest.raises(ConfigError, match="relative local path"):
        check_locations(load_config(None, ["output=runs/x"]), "smoke.yaml")
    assert check_locations(load_config(None, ["output=s3://bucket/run"]), "c") == []
    warnings = check_locations(load_config(None, ["output=/shared/run", "data.root=rel/data"]), "c")
    assert len(warnings) == 1 and "data.root" in warnings[0]
    with pytest.raises(ConfigError, match="registry 'models' is a relative local path"):
        check_locations(load_config(None, ["output=/shared/run", "registry=models"]), "c")
    unset = check_locations(load_config(None, ["output=/shared/run", "models.0.name=mymodel"]), "c")
    assert len(unset) == 1 and "no registry set; ['mymodel']" in unset[0]
    assert main(["submit", "--out", "runs/rel", "--address", "http://127.0.0.1:1"]) == 2
    for stage, reuse in (("run", "runs/phase1"), ("run", "s3://bucket/phase1"), ("extract", "/shared/phase1")):
        with pytest.raises(ConfigError, match="--reuse .*absolute path on storage the cluster's nodes share"):
            submit(None, "http://127.0.0.1:1", stage, [], "/shared/out", reuse=reuse)


def test_training_is_submitted_as_a_job_too():
    """`copydet submit configs/train/cluster.yaml --stage pretrain`: checked locally, run as `copydet pretrain`."""
    made = []
    factory = lambda a: made.append(FakeClient(a)) or made[-1]  # noqa: E731
    train = str(Path(__file__).parent.parent / "configs" / "train" / "cluster.yaml")
    for stage in ("pretrain", "finetune", "train-verifier"):
        assert submit(train, "http://head:8265", stage, ["pretrain.epochs=1"], None, client_factory=factory,
                      warn=lambda s: None) == "raysubmit_123"
        argv = shlex.split(made[-1].calls[0]["entrypoint"])
        assert argv[3:] == [stage, "configs/train/cluster.yaml", "--address", "auto", "--set", "pretrain.epochs=1"]
    with pytest.raises(ConfigError, match="output 'runs/train' is a relative local path"):
        submit(train, "http://head:8265", "pretrain", ["output=runs/train"], None, client_factory=factory)
    with pytest.raises(ConfigError, match="--set output=PATH"):
        submit(train, "http://head:8265", "finetune", [], "/shared/x", client_factory=factory)
    with pytest.raises(ConfigError, match=r"finetune.init '\.\./ck.safetensors' is a relative local path"):
        submit(train, "http://head:8265", "finetune", ["finetune.init=../ck.safetensors"], None, client_factory=factory)
    assert submit(train, "http://head:8265", "finetune", ["finetune.init=/shared/ck.safetensors"], None,
                  client_factory=factory, warn=lambda s: None) == "raysubmit_123"


def test_status_logs_and_stop_commands_wrap_the_sdk(monkeypatch, capsys):
    import types

    import jobs.submit
    seen = []

    class Sdk:
        def get_job_info(self, job):
            return types.SimpleNamespace(status=types.SimpleNamespace(value="FAILED"), message=f"{job} crashed")

        def get_job_logs(self, job):
            return f"log of {job}\n"

        def stop_job(self, job):
            seen.append(job)
            return False

    monkeypatch.setattr(jobs.submit, "client", lambda address: seen.append(address) or Sdk())
    assert main(["status", "j1", "--address", "http://h:8265"]) == 1
    assert main(["logs", "j2"]) == 0
    assert main(["stop", "j3"]) == 0
    out = capsys.readouterr()
    assert "FAILED j1 crashed" in out.out and "log of j2" in out.out and "j3: already finished" in out.err + out.out
    assert seen == ["http://h:8265", None, None, "j3"]


# -- a 3-node cluster on this machine ------------------------------------------------------


# Runs in its own Python: a Ray already started in the test process (ray_local) would hand its
# token-auth setting to the cluster's nodes. Commands on stdin: "remove I" (kill worker I), EOF.
CLUSTER_SCRIPT = """
import shutil, socket, sys, tempfile
from unittest import mock
import ray._private.utils
from ray.cluster_utils import Cluster

from tests.conftest import free_port

# Own temp dir: the job supervisor finds its GCS through <temp_dir>/ray_current_cluster, and
# the machine-wide /tmp/ray one must not point other tests' ray.init at this cluster.
tmp = tempfile.mkdtemp(prefix="raycd-", dir="/tmp")
port = free_port()
fast_death = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
              "health_check_failure_threshold": 3}
write_address = ray._private.utils.write_ray_address
with mock.patch.object(ray._private.utils, "write_ray_address", lambda *a, **k: None):
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(
        num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
        dashboard_agent_listen_port=free_port(), temp_dir=tmp, _system_config=fast_death))
try:
    write_address(cluster.gcs_address, tmp)
    workers = [cluster.add_node(num_cpus=1, resources={f"w{i}": 1}, temp_dir=tmp) for i in (1, 2)]
    print(f"READY http://127.0.0.1:{port}", flush=True)
    for line in sys.stdin:
        cmd, arg = line.split()
        if cmd == "remove":
            cluster.remove_node(workers[int(arg)], allow_graceful=False)
            print("REMOVED", flush=True)
finally:
    cluster.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
"""


class ClusterProcess:
    """A 3-node ``ray.cluster_utils.Cluster`` (head 1 CPU + 2 workers of 1 CPU with resources
    w1 / w2) in a child process; ``url`` is its Jobs API."""

    def __init__(self) -> None:
        # ray_local's ray.init exported RAY_ADDRESS; the job's driver must not inherit it
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.url = self.expect("READY").split()[1]

    def expect(self, word: str) -> str:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            line = self.proc.stdout.readline() if ready else ""
            if line.startswith(word):
                return line.strip()
            if self.proc.poll() is not None:
                raise RuntimeError(f"cluster process exited with {self.proc.returncode}")
        raise TimeoutError(f"cluster process did not say {word} in {TIMEOUT_S} s")

    def remove_worker(self, i: int) -> None:
        self.proc.stdin.write(f"remove {i}\n")
        self.proc.stdin.flush()
        self.expect("REMOVED")

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


@contextlib.contextmanager
def ray_cluster():
    """Yield a :class:`ClusterProcess`; auth off for it and its Jobs client (DEPS.md section 6)."""
    env = {"RAY_AUTH_MODE": "disabled",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}  # the job's `python`
    with mock.patch.dict(os.environ, env):
        cluster = ClusterProcess()
        try:
            yield cluster
        finally:
            stop_jobs(cluster.url)
            cluster.close()


def stop_jobs(url: str) -> None:
    """Stop the cluster's unfinished jobs so no entrypoint process outlives it."""
    c = client(url)
    for job in c.list_jobs():
        if not job.status.is_terminal():
            c.stop_job(job.submission_id)


def submit_when_ready(url: str, *argv: str) -> str:
    """``copydet submit`` retried while the head's job agent is still starting."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            return submit(*argv[:1], url, *argv[1:], warn=lambda s: None)
        except (RuntimeError, ConnectionError) as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster at {url} never accepted the job: {e}") from e
            time.sleep(1)


def wait_job(url: str, job_id: str, timeout: float = TIMEOUT_S) -> str:
    c = client(url)
    deadline = time.monotonic() + timeout
    while not (status := c.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            c.stop_job(job_id)
            raise TimeoutError(f"job {job_id} still {status} after {timeout} s:\n{c.get_job_logs(job_id)[-3000:]}")
        time.sleep(1)
    if status.value != "SUCCEEDED":
        job_logs(job_id, url)
    return status.value


def local_run(cfg_path: Path, out: Path) -> None:
    assert main(["run", str(cfg_path), "--out", str(out), *sum((["--set", s] for s in JOB_SETS), [])]) == 0


def assert_same_predictions(a: Path, b: Path) -> None:
    pa_, pb = read_predictions(a / "predictions.csv"), read_predictions(b / "predictions.csv")
    key = lambda t: list(zip(t.column("query_id").to_pylist(), t.column("reference_id").to_pylist()))  # noqa: E731
    assert pa_.num_rows > 0 and key(pa_) == key(pb)
    np.testing.assert_allclose(pa_.column("score").to_numpy(), pb.column("score").to_numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def job_local_run(ray_local, tmp_path_factory) -> tuple[Path, Path]:
    """(data root, run folder): the tiny dataset and its local run of the job config (:data:`JOB_SETS`)."""
    from tests.conftest import make_tiny_dataset
    tmp = tmp_path_factory.mktemp("job")
    data = make_tiny_dataset(tmp)
    local_run(write_config(tmp, data, tmp / "local"), tmp / "local")
    return data, tmp / "local"


def wait_for(predicate, what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_a_job_submitted_to_a_three_node_cluster_survives_losing_a_worker_and_matches_a_local_run(
        job_local_run, tmp_path):
    """The job's actors run on the cluster's nodes. Ray retries the lost node's tasks (and extract
    restarts its model actors), so the job most often succeeds as it is; if not, submitting it again
    on the same output folder finishes the run. One cluster job covers both: each costs ~80 s here."""
    data, local = job_local_run
    cfg_path = write_config(tmp_path, data, tmp_path / "cluster")
    feats = tmp_path / "cluster" / "features" / "tiny_cnn@64"
    logs = []
    with ray_cluster() as cluster:
        url = cluster.url
        job = submit_when_ready(url, str(cfg_path), "run", JOB_SETS, None)
        # Kill worker 1 as soon as extraction has written its first shard.
        wait_for(lambda: feats.is_dir() and any(p.suffix == ".parquet" for p in feats.iterdir()),
                 "the first feature shard")
        cluster.remove_worker(0)
        assert not client(url).get_job_status(job).is_terminal(), "the node must die while the job runs"
        first = wait_job(url, job)
        print(f"job after losing worker 1: {first}")
        job_logs(job, url, follow=True, write=logs.append)   # returns once the job has ended
        if first != "SUCCEEDED":   # not recovered in place: resubmit on the same output folder
            job = submit_when_ready(url, str(cfg_path), "run", JOB_SETS, None)
            assert wait_job(url, job) == "SUCCEEDED"
            job_logs(job, url, follow=True, write=logs.append)   # returns once the job has ended
        assert job_status(job, url).startswith("SUCCEEDED")
        nodes = {n.node_id[:12] for n in list_nodes(address=url, timeout=30)}   # the dead one too
    text = "".join(logs)
    assert len(nodes) == 3
    used = set(re.findall(r"node ([0-9a-f]{12})", text))
    assert used and used <= nodes, "the job's shard actors must run on the submitted-to cluster"
    assert "search tiny_cnn@64: 2 query shard(s) searched" in text and "shard 1:" in text  # 2 reference shards
    assert_complete(tmp_path / "cluster", "tiny_cnn@64")
    assert_same_predictions(local, tmp_path / "cluster")
    manifest = read_table(tmp_path / "cluster" / "manifest.parquet")
    assert pc.count_distinct(manifest.column("image_id")).as_py() == manifest.num_rows == 20
