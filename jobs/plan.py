"""``copydet plan``: what a config costs at its data size, before anything runs.

Patches per image come from the view plans (patchers.views.plan_views; proposals and
detections count at their budget, capped at ``max_patches``), feature bytes from each
model's dim and dtype, index memory from the search shard plan, and device-hours from a
throughput: measured here (one timed forward per model key, one faiss scan) or read from
a bench JSON ``{"device": ..., "images_per_s": {"resnet50@224": 950.0}, "search_pairs_per_s": 1e11}``.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.imageio import IMAGE_SUFFIXES
from core.knn import index_bytes
from core.knn import index_kind
from core.models.cards import ModelCard, RegistryError
from core.models.encoders import build_encoder
from core.models.resolve import repooled, resolve_model
from jobs.config import ModelEntry, PipelineConfig, SearchConfig
from jobs.inputs import InputError, split_folders
from jobs.preflight import resolved_each
from patchers.views import ViewConfig, plan_views

SIDES = {"query": "query", "reference": "reference", "train": "train"}  # split -> patches.<side>
DTYPE_BYTES = {"float32": 4, "float16": 2}


@dataclass(frozen=True)
class Throughput:
    device: str
    images_per_s: dict[str, float]   # model key -> patches embedded per second on one device
    search_pairs_per_s: float        # query x reference inner products per second (exact)


@dataclass(frozen=True)
class KeyPlan:
    key: str
    dim: int
    dtype: str
    feature_bytes: dict[str, int]    # split -> bytes on disk (embeddings only)
    index_bytes: int                 # reference index, all shards together
    index_kind: str
    shard_bytes: int                 # largest shard's index
    extract_hours: float
    search_hours: float


@dataclass(frozen=True)
class Plan:
    images: dict[str, int]
    patches_per_image: dict[str, int]
    keys: list[KeyPlan]
    device: str
    gpus: int

    def patches(self, split: str) -> int:
        return self.images[split] * self.patches_per_image[split]


def patches_per_image(view: ViewConfig) -> int:
    """Upper bound of patches per image: planned views + proposal/detector budgets, capped."""
    planned = len(plan_views(view)) + view.proposals + (view.max_patches if view.detector else 0)
    return min(planned, view.max_patches)


def count_images(folder: str | None) -> int:
    if not folder or not Path(folder).is_dir():
        return 0
    return sum(1 for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def split_counts(cfg: PipelineConfig, images: int | None = None, **given: int | None) -> dict[str, int]:
    """Images per split: ``given`` (references=, queries=, train=), else ``images``, else the folders.
    A configured folder that does not exist, or references or queries counted as none, is an
    :class:`InputError`: an all-zero plan would read as "costs nothing"."""
    names = {"reference": "references", "query": "queries", "train": "train"}
    counted = [s for s, arg in names.items() if given.get(arg) is None and images is None]
    folders = split_folders(cfg.data) if counted else {}
    out = {}
    for split, arg in names.items():
        n = given.get(arg)
        out[split] = n if n is not None else images if images is not None else count_images(folders.get(split))
        if cfg.data.limit:
            out[split] = min(out[split], cfg.data.limit)
        if split in counted and split != "train" and out[split] == 0:
            where = folders.get(split, "no folder configured")
            raise InputError(f"data.{arg}: no images to plan for ({where}); give --{arg} N or --images N")
    return out


def reference_index_memory(rows: int, dim: int, cfg: SearchConfig) -> tuple[int, int, str]:
    """(all shards, largest shard, kind) of the reference index memory for ``rows`` vectors,
    with the kind the search stage builds (:func:`core.knn.index_kind` over all rows)."""
    if rows == 0:
        return 0, 0, "-"
    spec = cfg.index_spec()
    kind = index_kind(rows, spec)
    full, rest = divmod(rows, cfg.shard_size)  # the search stage fills shards in order (ensemble.sharded.plan_shards)
    full_bytes = index_bytes(cfg.shard_size, dim, kind, spec) if full else 0
    rest_bytes = index_bytes(rest, dim, kind, spec) if rest else 0
    return full * full_bytes + rest_bytes, max(full_bytes, rest_bytes), kind


def model_cards(cfg: PipelineConfig, planned: Mapping[str, ModelCard] = {}) -> dict[str, ModelCard]:
    """The card of every model entry: registered (or a backbone / checkpoint), else a model that a
    training config will register (``planned``, see :func:`pretrain.train.fanout.planned_cards`).
    Every name that resolves to neither is named in one error, with what makes it."""
    def card(m: ModelEntry) -> ModelCard:
        try:
            return resolve_model(m.name, cfg.registry, dim=m.dim, pool=m.pool)
        except RegistryError:
            if m.name not in planned:
                raise
            return repooled(planned[m.name], m.pool) if m.pool else planned[m.name]
    cards = resolved_each([(f"models.{i}.name", m.name, lambda m=m: card(m)) for i, m in enumerate(cfg.models)])
    return {m.name: c for m, c in zip(cfg.models, cards)}


def measure(cfg: PipelineConfig, cards: Mapping[str, ModelCard], batch: int = 2) -> Throughput:
    """Time ``batch`` 4:3 photos per model key through its encoder (backbone or external runtime,
    preprocessing included, as extraction runs it) and one faiss scan on this machine."""
    import faiss
    import torch

    rng = np.random.default_rng(0)
    rates = {}
    for entry, scale, key in cfg.model_keys():
        encoder = build_encoder(cards[entry.name], scale)
        photos = [Image.fromarray(rng.integers(0, 256, (scale, scale * 4 // 3, 3), np.uint8))] * batch
        encoder.embed(photos[:1])
        t0 = time.perf_counter()
        encoder.embed(photos)
        rates[key] = batch / (time.perf_counter() - t0)
    db, q = rng.random((20000, 256), np.float32), rng.random((1000, 256), np.float32)
    index = faiss.IndexFlatIP(256)
    index.add(db)
    t0 = time.perf_counter()
    index.search(q, 10)
    pairs = len(db) * len(q) / (time.perf_counter() - t0)
    device = "cuda" if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads (this machine)"
    return Throughput(device, rates, pairs)


def read_bench(path: str) -> Throughput:
    try:
        raw = json.loads(Path(path).read_text())
        return Throughput(raw.get("device", path), {k: float(v) for k, v in raw["images_per_s"].items()},
                          float(raw["search_pairs_per_s"]))
    except OSError as e:
        raise ValueError(f"--throughput {path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--throughput {path}: not a bench JSON with images_per_s {{key: rate}} and "
                         f"search_pairs_per_s ({type(e).__name__}: {e})") from None


def throughputs(cfg: PipelineConfig, cards: Mapping[str, ModelCard], bench: str | None = None) -> Throughput:
    return read_bench(bench) if bench else measure(cfg, cards)


def searched_pairs(cfg: PipelineConfig, plan: Plan) -> int:
    """(query patch, indexed vector) products the search computes, normalisation included."""
    q, r = plan.patches("query"), plan.patches("reference")
    if cfg.whole_reference_index():  # the whole query x reference patches, other query patches x whole references
        qi = plan.images["query"]
        pairs = qi * r + (q - qi) * plan.images["reference"]
    else:
        pairs = q * r
    return pairs + (q * plan.patches("train") if cfg.search.normalize.enabled else 0)


def build_plan(cfg: PipelineConfig, images: dict[str, int], tp: Throughput, gpus: int = 1,
               dims: dict[str, int] | None = None) -> Plan:
    """Sizes and device-hours for every model key of ``cfg`` at ``images`` per split."""
    per = {split: patches_per_image(getattr(cfg.patches, side)) for split, side in SIDES.items()}
    dims = dims or {name: int(card.dim) for name, card in model_cards(cfg).items()}
    plan = Plan(images, per, [], tp.device, gpus)
    for entry, _, key in cfg.model_keys():
        if key not in tp.images_per_s:
            raise ValueError(f"no throughput for {key}; known: {sorted(tp.images_per_s)}")
        dim = dims[entry.name]
        total, biggest, kind = reference_index_memory(plan.patches("reference"), dim, cfg.search)
        if cfg.whole_reference_index():  # same shard plan, each shard keeping its whole-image rows only
            per_image = plan.patches_per_image["reference"]
            whole = cfg.search.model_copy(update={"shard_size": math.ceil(cfg.search.shard_size / per_image)})
            w_total, w_biggest, _ = reference_index_memory(plan.images["reference"], dim, whole)
            total, biggest = total + w_total, max(biggest, w_biggest)
        n_patches = sum(plan.patches(s) for s in SIDES)
        searched = searched_pairs(cfg, plan)
        plan.keys.append(KeyPlan(
            key=key, dim=dim, dtype=entry.dtype,
            feature_bytes={s: plan.patches(s) * dim * DTYPE_BYTES[entry.dtype] for s in SIDES},
            index_bytes=total, index_kind=kind, shard_bytes=biggest,
            extract_hours=n_patches / tp.images_per_s[key] / 3600,
            search_hours=searched / tp.search_pairs_per_s / 3600))
    return plan


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_plan(plan: Plan) -> str:
    """The plan as two readable tables: data sizes, then one row per model key."""
    w = max([18, *(len(k.key) + 2 for k in plan.keys)])
    lines = ["split       images   patches/img      patches"]
    for s in SIDES:
        lines.append(f"{s:<10}{plan.images[s]:>9,}{plan.patches_per_image[s]:>14}{plan.patches(s):>13,}")
    lines += ["patches/img is the most a side's views give (detector and proposal boxes count up to max_patches)",
              "", f"device-hours measured on: {plan.device}; wall hours on {plan.gpus} device(s) in parallel", "",
              f"{'model@scale':<{w}}{'dim':>5} {'dtype':<8}{'ref feats':>11}{'query feats':>12}{'train feats':>12}"
              f"{'index (kind)':>20}{'max shard':>11}{'extract h':>11}{'search h':>10}{'wall h':>9}"]
    for k in plan.keys:
        wall = (k.extract_hours + k.search_hours) / plan.gpus
        lines.append(f"{k.key:<{w}}{k.dim:>5} {k.dtype:<8}{human(k.feature_bytes['reference']):>11}"
                     f"{human(k.feature_bytes['query']):>12}{human(k.feature_bytes['train']):>12}"
                     f"{human(k.index_bytes) + ' (' + k.index_kind + ')':>20}{human(k.shard_bytes):>11}"
                     f"{k.extract_hours:>11.1f}{k.search_hours:>10.1f}{wall:>9.1f}")
    ex, se = sum(k.extract_hours for k in plan.keys), sum(k.search_hours for k in plan.keys)
    lines.append(f"{'total':<{w}}{'':>5} {'':<8}{human(sum(sum(k.feature_bytes.values()) for k in plan.keys)):>35}"
                 f"{human(sum(k.index_bytes for k in plan.keys)):>20}{'':>11}{ex:>11.1f}{se:>10.1f}"
                 f"{(ex + se) / plan.gpus:>9.1f}")
    return "\n".join(lines)
