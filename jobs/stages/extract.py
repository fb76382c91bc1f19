"""Stage 3: patches x (model, scale) -> features/<key>/<shard>-<chunk>.parquet.

One Ray Data pipeline for all feature keys: CPU tasks decode each image once and cut/resize its
patches for every key (:func:`patchers.extract.decode_chunk`); a pool of model actors that hold
every key's model embeds them and writes one feature file per key and chunk
(:class:`patchers.extract.ChunkEmbedder`). The driver plans chunks and counts what comes back;
it never holds pixels or embeddings. A chunk whose files all exist is skipped on a re-run.

Resources come from the config: with ``extract.use_gpu`` (``auto``: when the cluster has GPUs or
its autoscaler can add GPU nodes) every actor asks for ``gpus_per_actor``, and the pool grows
from ``min_actors`` to ``max_actors`` under load, so the autoscaler provisions GPU workers.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping

import ray
from ray.data import ActorPoolStrategy
from tqdm.auto import tqdm

from core.contracts import chunk_file, shard_split
from core.logs import last_line
from core.models.cards import ModelCard
from core.models.preprocess import Preprocess
from core.models.registry import weights_hash
from core.models.resolve import resolve_model
from core.settings import pin_settings
from jobs.completeness import Chunk, chunk_plan
from jobs.config import ExtractConfig, ModelEntry, PipelineConfig
from jobs.layout import RunDir, shard_names
from jobs.runtime import gpus_possible
from jobs.stages.reduce import check_train_rows
from jobs.stages.search import check_background
from patchers.extract import ChunkEmbedder, ChunkTask, KeySpec, decode_chunk

log = logging.getLogger(__name__)


NODE_LOSSES = 3  # lost nodes a stage goes on after (each time with the chunks not yet written)
NODE_DEATH_S = 30.0  # Ray's health checks mark a lost node dead in ~15 s


def actor_resources(cfg: ExtractConfig) -> dict:
    """Pool size bounds and per-actor resources, all from the config."""
    possible = gpus_possible() if cfg.use_gpu != "no" else 0.0
    if cfg.use_gpu == "yes" and not possible:
        raise RuntimeError("extract.use_gpu is 'yes' but the Ray cluster has no GPUs and cannot add any")
    if possible:
        most = cfg.max_actors or max(1, int(possible // cfg.gpus_per_actor))
        return {"min_size": min(cfg.min_actors, most), "max_size": most, "num_gpus": cfg.gpus_per_actor,
                "num_cpus": cfg.cpus_per_actor, "threads": cfg.num_threads, "use_gpu": True}
    most = cfg.max_actors or 1
    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    return {"min_size": min(cfg.min_actors, most), "max_size": most, "num_gpus": 0, "num_cpus": cfg.cpus_per_actor,
            "threads": cfg.num_threads or max(1, cpus // most), "use_gpu": False}


def key_specs(cfg: PipelineConfig, run: RunDir | None = None,
              cards: Mapping[str, ModelCard] | None = None) -> list[KeySpec]:
    """Every (model, scale) key's card, pixels and output, in config order. ``cards`` (feature
    key -> card, e.g. an index's own copies) replaces resolving the names; without ``run``
    nothing is written (``folder`` is empty)."""
    specs = []
    for entry, scale, key in cfg.model_keys():
        card = cards[key] if cards is not None else resolve_model(entry.name, cfg.registry, dim=entry.dim,
                                                                  pool=entry.pool)
        if card.weights:  # the workers load the weights with this hash or stop (build_encoders)
            card = card.model_copy(update={"weights_sha256": weights_hash(card)})
        bucket = cfg.extract.shape_bucket if card.resize != "square" else 0
        specs.append(KeySpec(card, Preprocess.for_card(card, scale, bucket), run.features(key) if run else "",
                             entry.name, scale, entry.dtype, entry.precision, entry.batch_size))
    return specs


def pending_chunks(plan: list[Chunk], keys: list[KeySpec]) -> list[ChunkTask]:
    """Chunks of ``plan`` with the keys whose feature file is still missing."""
    done = [set(shard_names(k.folder)) for k in keys]
    tasks = []
    for shard, index, start, stop in plan:
        todo = tuple(k for k, names in enumerate(done) if chunk_file(shard, index) not in names)
        if todo:
            tasks.append(ChunkTask(shard, index, start, stop, todo))
    return tasks


def train_patches(plan: list[Chunk]) -> int:
    """How many train patches the run has: one train descriptor each, for every key."""
    return sum(stop - start for shard, _, start, stop in plan if shard_split(shard) == "train")


def key_settings(cfg: PipelineConfig, entry: ModelEntry, key: KeySpec) -> dict:
    """What a feature folder's files depend on; a trained model by the content of its weights."""
    settings = {"model": entry.name, "scale": key.scale, "dim": entry.dim, "dtype": key.dtype,
                "chunk_patches": cfg.extract.chunk_patches}
    settings.update({"pool": entry.pool} if entry.pool else {})
    settings.update({"precision": entry.precision} if entry.precision != "float32" else {})
    settings.update({"shape_bucket": key.pre.bucket} if key.pre.bucket else {})
    settings.update({"weights_sha256": weights_hash(key.card)} if key.card.weights else {})
    return settings


def pin_keys(cfg: PipelineConfig, keys: list[KeySpec]) -> None:
    """Refuse to resume a feature folder made with other settings (see ``pin_settings``)."""
    for (entry, _, _), k in zip(cfg.model_keys(), keys):
        pin_settings(k.folder, key_settings(cfg, entry, k), "extract")


def actor_failure(e: Exception, keys: list[KeySpec], retries: int) -> Exception:
    """Why the model actors died, in a line: weights replaced since the stage pinned them, an actor
    that could not start, or one that died on a chunk (memory, most often)."""
    last = last_line(e)[-300:]
    if getattr(e, "actor_init_failed", False):
        for k in keys:
            weights_hash(k.card)  # the usual cause: the weights changed under a running stage
        return RuntimeError(f"extract: the model actor could not start ({last})")
    return RuntimeError(f"extract: a chunk's model actor died {retries + 1} times (out of memory? see Ray's lines "
                        "above); the chunks written are kept, so a re-run resumes: give each actor more memory "
                        f"(fewer at once: extract.max_actors) or raise extract.chunk_retries ({last})")


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def lost_nodes(before: set[str], wait_s: float = NODE_DEATH_S) -> set[str]:
    """The nodes of ``before`` that Ray has marked dead, waiting up to ``wait_s`` for its health
    checks to notice one; none when ``before`` is one node (losing it is losing the driver's)."""
    if len(before) < 2:
        return set()
    deadline = time.monotonic() + wait_s
    while not (lost := before - alive_nodes()) and time.monotonic() < deadline:
        time.sleep(1)
    return lost


def run_extract(cfg: PipelineConfig, run: RunDir) -> None:
    keys = key_specs(cfg, run)
    plan = chunk_plan(run, cfg.extract.chunk_patches, "extract")  # checks the patch shards first
    tasks = pending_chunks(plan, keys)
    train_rows = train_patches(plan)
    check_background(cfg, train_rows, "extract")
    check_train_rows(cfg.reduce, train_rows, "extract")
    pin_keys(cfg, keys)  # before any work: shards of other settings are refused, not resumed
    for losses in range(NODE_LOSSES + 1):
        if not tasks:
            return
        nodes = alive_nodes()
        try:
            embed_chunks(cfg, run, keys, tasks)
            return
        except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as e:
            # a chunk's retries can all go to an actor on a lost node before Ray marks the node dead
            lost = lost_nodes(nodes) if losses < NODE_LOSSES else set()
            if not lost:
                raise actor_failure(e, keys, cfg.extract.chunk_retries) from e
            log.warning(f"extract: lost {len(lost)} node(s) of the cluster; going on with the chunks not written")
            tasks = pending_chunks(plan, keys)


def embed_chunks(cfg: PipelineConfig, run: RunDir, keys: list[KeySpec], tasks: list[ChunkTask]) -> None:
    """Decode and embed ``tasks`` in one Ray Data pipeline, each chunk's files written by its actor."""
    res = actor_resources(cfg.extract)
    names = ", ".join(os.path.basename(k.folder) for k in keys)
    log.info(f"extract: {len(tasks)} chunk(s) for {names}; {res['min_size']}..{res['max_size']} model actor(s) "
             f"with {res['num_gpus']} GPU and {res['num_cpus']} CPU each")
    pres = [k.pre for k in keys]
    ds = ray.data.from_items([vars(t) for t in tasks], override_num_blocks=len(tasks))
    ds = ds.map(lambda row: decode_chunk(ChunkTask(**{**row, "keys": tuple(row["keys"])}), run.patches, run.manifest,
                                         pres, cfg.data.max_pixels), num_cpus=cfg.extract.decode_cpus)
    # Ray Data restarts dead actors (max_restarts=-1), but a chunk that kills every actor it meets
    # (out of memory) must fail the stage, not loop.
    with warnings.catch_warnings():  # the retry limits have no named parameter before Ray 2.64 (pinned < 2.61)
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        ds = ds.map_batches(ChunkEmbedder, batch_size=1, batch_format="numpy",
                            fn_constructor_kwargs={"keys": keys, "errors_dir": run.errors, "use_gpu": res["use_gpu"],
                                                   "num_threads": res["threads"]},
                            compute=ActorPoolStrategy(min_size=res["min_size"], max_size=res["max_size"]),
                            num_cpus=res["num_cpus"], num_gpus=res["num_gpus"], max_restarts=-1,
                            max_task_retries=cfg.extract.chunk_retries)
    bad = 0
    with tqdm(total=sum(t.stop - t.start for t in tasks), desc=f"extract {names}", unit="patch") as bar:
        for row in ds.iter_rows():
            bad += int(row["errors"])
            bar.update(int(row["planned"]))
    if bad:
        log.warning(f"extract: {bad} image(s) no longer decode; listed in {run.errors}")
