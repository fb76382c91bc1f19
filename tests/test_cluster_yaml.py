"""cluster.yaml is checked by Ray's own cluster-config schema, the way `ray up` checks it."""
import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

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
    with pytest.raises(Exception, match="head"):
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


def test_cluster_runs_copydet_without_docker_and_reachable_by_submit():
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    assert "docker" not in cfg and cfg["head_node_type"] == "head"
    assert cfg["available_node_types"]["head"]["resources"].get("GPU", 0) == 0  # no model actors on the head
    assert any(dst.endswith("configs") for dst in cfg["file_mounts"])
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    # copydet submit's Jobs client sends no token: ray start must not turn token auth on
    assert all("RAY_AUTH_MODE=disabled" in c for c in starts if "ray start" in c)
