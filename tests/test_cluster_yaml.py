"""cluster.yaml is checked by Ray's own cluster-config schema, the way `ray up` checks it; its nodes
keep Ray's token auth on, and copydet's job commands send the token (to a stand-in Jobs API)."""
import copy
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import imported_by

CLUSTER_YAML = Path(__file__).parent.parent / "cluster.yaml"


def ray_validate(cfg: dict) -> None:
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config
    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    jsonschema.validate(cfg, json.load(open(schema_path)))
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_passes_rays_schema():
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    ray_validate(cfg)
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["max_workers"] >= gpu["min_workers"]
    assert any("[gpu]" in c for c in cfg["setup_commands"])


def test_missing_head_node_type_is_rejected():
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    del cfg["available_node_types"]["head"]
    with pytest.raises(ValueError, match="`head_node_type` must be one of `available_node_types`"):
        ray_validate(cfg)


def test_bad_resource_value_is_rejected():
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "eight"
    with pytest.raises(jsonschema.ValidationError, match="eight"):
        ray_validate(cfg)


def test_misspelled_resources_key_is_rejected():
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    gpu = cfg["available_node_types"]["gpu_worker"]
    gpu["resource"] = gpu.pop("resources")
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        ray_validate(cfg)


def test_min_workers_above_max_is_rejected():
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    cfg["available_node_types"]["gpu_worker"]["min_workers"] = 99
    with pytest.raises(ValueError, match="min_workers"):
        ray_validate(cfg)


def test_cluster_runs_copydet_without_docker_with_token_auth_on():
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    assert "docker" not in cfg and cfg["head_node_type"] == "head"
    assert cfg["available_node_types"]["head"]["resources"].get("GPU", 0) == 0  # no model actors on the head
    assert any(dst.endswith("configs") for dst in cfg["file_mounts"])
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert "disabled" not in CLUSTER_YAML.read_text()
    # every node gets the token that `ray get-auth-token --generate` wrote on the launching machine
    home = f"/home/{cfg['auth']['ssh_user']}"
    assert cfg["file_mounts"][f"{home}/.ray/auth_token"] == "~/.ray/auth_token"


class JobsApi(BaseHTTPRequestHandler):
    """A stand-in for a token-auth Ray Jobs API: 401 without ``Bearer <TOKEN>``, else version and logs."""

    TOKEN = "copydet-test-token"
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append(self.headers.get("Authorization", ""))
        if self.headers.get("Authorization") != f"Bearer {self.TOKEN}":
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b"Unauthorized: Missing authentication token")
            return
        body = {"ray_version": "2.60.0", "version": "4", "ray_commit": "x"} if self.path == "/api/version" \
            else {"logs": "log of raysubmit_1\n"}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_job_commands_send_the_token_from_the_token_file(tmp_path):
    """README: `RAY_AUTH_MODE=token` and the token in ~/.ray/auth_token (here $RAY_AUTH_TOKEN_PATH)."""
    token = tmp_path / "auth_token"
    token.write_text(JobsApi.TOKEN)
    server = ThreadingHTTPServer(("127.0.0.1", 0), JobsApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    root = str(Path(__file__).parent.parent)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}

    def logs(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "import sys; from jobs.cli import main; sys.exit(main())",
                               "logs", "raysubmit_1", "--address", url], capture_output=True, text=True,
                              env={**base, "PYTHONPATH": root, **env}, timeout=120, cwd=root)

    try:
        ok = logs(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
        assert ok.returncode == 0 and ok.stdout == "log of raysubmit_1\n", ok.stderr
        assert JobsApi.seen and set(JobsApi.seen) == {f"Bearer {JobsApi.TOKEN}"}
        refused = logs(RAY_AUTH_MODE="disabled")
        assert refused.returncode == 2 and "Authentication required" in refused.stderr
    finally:
        server.shutdown()


def pretend_a_cluster_listens(monkeypatch) -> None:
    """Every cluster address takes connections (copydet's check, not Ray's, is skipped)."""
    monkeypatch.setattr("jobs.runtime.check_answers", lambda address, where: None)


def test_a_refused_connection_names_token_authentication(monkeypatch, capsys, tmp_path):
    """Ray names a missing token only in warning lines; copydet's one error line says what to check."""
    import ray

    from jobs.cli import main

    def refused(**kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}")

    pretend_a_cluster_listens(monkeypatch)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # an embedded Ray started earlier in this process sets it
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    assert main(["manifest", "--address", "127.0.0.1:1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "Failed to connect to Ray cluster at 127.0.0.1:1" in err and "RAY_AUTH_MODE=token" in err


def test_without_an_address_copydet_starts_its_own_ray_beside_a_ray_start_cluster(tmp_path):
    """ray.init() alone joins the cluster `ray start` left recorded on this machine (here a dead
    one): copydet's commands without --address use their own embedded Ray, as README says."""
    root = str(Path(__file__).parent.parent)
    code = ("import sys, ray._private.services as s; s.find_bootstrap_address = lambda *a: '127.0.0.1:9'; "
            "from jobs.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", code, "manifest", "--out", str(tmp_path / "run"),
                           "--set", "ray.num_cpus=1"], capture_output=True, text=True, timeout=300, cwd=root,
                          env={**env, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "manifest.parquet").is_dir()
    assert "Token authentication is enabled" not in done.stderr  # Ray's WARNING, no news to a user
    assert "ray: starting a local Ray, num_cpus=1" in done.stderr  # said before the seconds it takes


def init_arguments(monkeypatch, address: str | None = None) -> dict:
    """The keyword arguments ``jobs.runtime.init_ray`` gives ``ray.init`` (no Ray is started)."""
    import ray

    from jobs.config import RayConfig
    from jobs.runtime import init_ray

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr("jobs.runtime.signal.signal", lambda *a: None)
    init_ray(RayConfig(), address)
    return seen


def test_ray_client_gets_json_init_arguments_and_stages_it_cannot_run_are_refused(monkeypatch, tmp_path, capsys):
    """Ray Client (ray://) sends ray.init's arguments as JSON: a function as the workers' setup hook
    failed every command at connect; and Ray Data (the extract stage) does not run through it."""
    import json

    from jobs.cli import main

    pretend_a_cluster_listens(monkeypatch)
    seen = init_arguments(monkeypatch, "ray://127.0.0.1:10001")
    assert seen["address"] == "ray://127.0.0.1:10001" and json.dumps(seen["runtime_env"])
    assert main(["run", "--address", "ray://127.0.0.1:10001", "--out", str(tmp_path / "run")]) == 2
    assert "does not work through Ray Client (ray://)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_workers_setup_hook_imports_neither_torch_nor_copydets_jobs(monkeypatch):
    """Every new Ray worker process, so every actor, imports the setup hook's module before its first
    call. In ``jobs.runtime`` it pulled in timm and torch: ~5 s per shard actor here."""
    seen = init_arguments(monkeypatch)
    module, _, name = seen["runtime_env"]["worker_process_setup_hook"].rpartition(".")
    code = f"import importlib; getattr(importlib.import_module({module!r}), {name!r})()"
    assert imported_by(code, ("torch", "timm", "faiss", "jobs"))[2] == []


def forbid_ray(monkeypatch) -> None:
    """No Ray is running, and starting one fails the test."""
    import ray

    def no_ray(**kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_ray)


def test_a_jobs_api_address_in_ray_address_is_named_not_passed_to_ray(monkeypatch, tmp_path, capsys):
    """README's cluster recipe exports RAY_ADDRESS=http://...:8265 for the job commands; a command that
    runs on Ray then says what that address is for, instead of Ray's "Invalid Ray address"."""
    from jobs.cli import main

    forbid_ray(monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert main(["manifest", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "$RAY_ADDRESS http://127.0.0.1:8265 is a cluster's Jobs API" in err and "unset RAY_ADDRESS" in err
    assert main(["manifest", "--out", str(tmp_path / "run"), "--address", "http://head:8265"]) == 2
    assert "--address http://head:8265 is a cluster's Jobs API" in capsys.readouterr().err


def test_an_address_where_nothing_answers_is_refused_before_anything_is_written(monkeypatch, tmp_path, capsys):
    """ray.init retries such an address for minutes, printing only Ray's warnings."""
    from jobs.cli import main
    from tests.conftest import free_port

    forbid_ray(monkeypatch)
    address = f"127.0.0.1:{free_port()}"
    assert main(["run", "--out", str(tmp_path / "run"), "--address", address]) == 2
    assert f"--address {address}: no Ray cluster answers there (Connection refused)" in capsys.readouterr().err
    monkeypatch.setenv("RAY_ADDRESS", f"ray://{address}")
    assert main(["manifest", "--out", str(tmp_path / "run")]) == 2
    assert f"$RAY_ADDRESS ray://{address}: no Ray cluster answers there" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
