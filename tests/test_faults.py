"""Faults: retried tasks, restarted shard actors, and extract losing the node of its model actor.

A whole job losing a worker node: ``tests/test_submit.py`` (its three-node cluster job).
"""
import os

import numpy as np
import pyarrow.compute as pc
import pytest
import ray

from core.knn import IndexSpec, knn
from core.store import read_table
from ensemble.sharded import ShardedIndex
from jobs.config import RayConfig
from jobs.layout import RunDir, shard_names
from jobs.runtime import WorkerFailed, on_workers, require_gpus, run_tasks
from tests.test_sharded import unit, write_refs


def test_run_tasks_retries_a_dead_worker(ray_local, tmp_path):
    def die_once(marker: str, x: int) -> int:
        """Kills its own worker process the first time it runs (a crashed node's worker)."""
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return x * 2

    marker = str(tmp_path / "died")
    assert sorted(run_tasks(die_once, [(marker, 1), (marker, 2)], "retry")) == [2, 4]
    assert os.path.exists(marker)


def test_on_workers_answers_each_item_once_and_names_a_failed_worker(ray_local):
    class Doubler:
        def __init__(self, fail: str = "") -> None:
            if fail:
                raise ValueError(fail)

        def double(self, x: int) -> tuple[int, int]:
            return 2 * x, os.getpid()

    items, options = [(i,) for i in range(6)], {"num_cpus": 0.5}
    on_actors = list(on_workers(Doubler, (), "double", items, 2, options, RayConfig()))
    assert sorted(y for y, _ in on_actors) == [0, 2, 4, 6, 8, 10]
    assert len({pid for _, pid in on_actors}) == 2 and os.getpid() not in {pid for _, pid in on_actors}
    assert {pid for _, pid in on_workers(Doubler, (), "double", items, 1, options, RayConfig())} == {os.getpid()}
    with pytest.raises(WorkerFailed, match="ValueError: no model here"):
        list(on_workers(Doubler, ("no model here",), "double", items, 2, options, RayConfig()))


def test_gpus_asked_of_a_cluster_without_any_are_refused_not_waited_for(ray_local):
    """Ray would keep GPU workers pending for ever on this 0-GPU cluster: a setting that asks for
    GPUs is refused, named, before any worker is started (the verify stage: test_learned_verifier)."""
    with pytest.raises(RuntimeError, match="index.num_gpus is 0.5 but the Ray cluster has no GPUs"):
        list(on_workers(dict, (), "get", [("a",), ("b",)], 2, {"num_gpus": 0.5}, RayConfig(),
                        gpus_setting="index.num_gpus"))
    with pytest.raises(RuntimeError, match="serve.num_gpus is 1 but .* no GPUs and cannot add any"):
        require_gpus(1, "serve.num_gpus")
    require_gpus(0, "serve.num_gpus")


def test_killed_shard_actor_restarts_and_answers(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    x, q = unit(rng, 60), unit(rng, 5)
    index = ShardedIndex(write_refs(tmp_path, x, 30), IndexSpec(), shard_size=30, k_max=3,
                         actor_options={"num_cpus": 0.25}, timeout_s=120)
    try:
        before = index.search(q, 3)
        ray.kill(index.actors[1], no_restart=False)   # like its node dying: Ray restarts it
        after = index.search(q, 3)                    # the restarted actor reloads its own rows
    finally:
        index.close()
    _, want = knn(q, x, 3)
    assert (after[1] == np.vectorize(lambda i: f"R{i:05d}")(want)).all()
    np.testing.assert_array_equal(before[1], after[1])


def assert_complete(out, key: str) -> None:
    """Every patch has exactly one feature row, every query patch exactly k candidates."""
    run = RunDir(str(out))
    patches = read_table(run.patches)
    feats = read_table(run.features(key))
    ids = lambda t, a, b: set(zip(t.column(a).to_pylist(), t.column(b).to_pylist()))  # noqa: E731
    assert feats.num_rows == patches.num_rows == len(ids(feats, "image_id", "patch_id"))
    assert ids(feats, "image_id", "patch_id") == ids(patches, "image_id", "patch_id")
    cands = read_table(run.candidates(key))
    queries = feats.filter(pc.is_in(feats.column("image_id"), cands.column("query_id").unique()))
    assert cands.num_rows == 5 * queries.num_rows   # search.k=5, 8 reference rows
    assert len(shard_names(run.candidates(key))) == len(shard_names(run.features(key), "query"))


def test_extract_goes_on_after_losing_the_node_of_its_model_actor(ray_local, tiny_dataset, tmp_path, monkeypatch):
    """A chunk's retries can all go to the actor of a node Ray has not yet marked dead: the stage
    goes on with the chunks not written once the node is gone, and fails as before when none is."""
    from jobs.cli import main
    from jobs.stages import extract
    from tests.test_pipeline import TINY

    real, calls, nodes = extract.embed_chunks, [], [{"head", "gpu-1"}, {"head"}]

    def embed_once_on_a_lost_node(cfg, run, keys, tasks):
        calls.append(len(tasks))
        if len(calls) == 1:
            real(cfg, run, keys, tasks[:1])  # a chunk written before the node was lost
            raise ray.exceptions.ActorUnavailableError("failed to connect to all addresses", None)
        real(cfg, run, keys, tasks)

    monkeypatch.setattr(extract, "embed_chunks", embed_once_on_a_lost_node)
    monkeypatch.setattr(extract, "alive_nodes", lambda: nodes.pop(0) if len(nodes) > 1 else nodes[0])
    argv = ["run", "--out", str(tmp_path / "run"), "--set", f"data.root={tiny_dataset}",
            "--set", "extract.chunk_patches=8", *sum((["--set", s] for s in TINY), [])]
    assert main(argv) == 0
    assert len(calls) == 2 and calls[1] == calls[0] - 1  # the second pass: the chunks not yet written
    assert_complete(tmp_path / "run", "resnet18@64")

    calls.clear()
    nodes[:] = [{"head"}]  # one node: nothing was lost, an actor died (out of memory, most often)
    argv[2] = str(tmp_path / "run2")
    assert main(argv) == 2 and len(calls) == 1
