"""CPU-seconds per image of pipeline configs: extraction per side, and verification per query.

    .venv/bin/python bench/cost.py configs/sscd_ensemble.yaml configs/balanced.yaml \
        --queries ../shared/bench/minidisc-hard/queries --references ../shared/bench/minidisc-dev/references \
        --train ../shared/bench/minidisc-dev/train --predictions runs/ens-hard/predictions.csv \
        --decoys runs/ens-hard/fused_decoys.parquet --limit 40

For each config and side (query, reference, train) the first ``--limit`` images of that side's
folder go through what extraction does to them: decode, plan the side's views, cut, resize and
embed every patch with every (model, scale) key. Verification re-checks the ``verify.top_k``
best pairs of the first ``--limit`` queries of ``--predictions`` (fresh keypoint cache, as the
stage starts); with ``fuse.threshold: auto`` those queries' best ``verify.decoy_top_k`` train
decoys in ``--decoys`` (a run's ``fused_decoys.parquet``) are verified too, as the stage does.
Times are CPU-seconds of this process with one torch / onnxruntime / OpenCV / BLAS thread, so
other load on the machine does not skew them and the configs compare in one run. ``per query`` =
query extraction + verification of predictions and decoys (what a new query costs); ``minidisc``
adds the reference and train extraction spread over the queries (folder sizes given).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from core.imageio import list_images, load_rgb  # noqa: E402
from core.metrics import read_predictions  # noqa: E402
from core.models.cards import RegistryError  # noqa: E402
from core.models.encoders import Encoder  # noqa: E402
from core.models.runtimes import runtime  # noqa: E402
from core.store import read_table  # noqa: E402
from ensemble.fuse import top_k_per_query  # noqa: E402
from ensemble.verify import verify_pairs  # noqa: E402
from jobs.config import PipelineConfig, load_config  # noqa: E402
from jobs.layout import RunDir  # noqa: E402
from jobs.stages.extract import key_specs  # noqa: E402
from jobs.stages.patch import resolve_detector  # noqa: E402
from jobs.stages.verify import decoy_depth, scorer_for  # noqa: E402
from patchers.extract import cut_patch  # noqa: E402
from patchers.plan import plan_images  # noqa: E402
from patchers.proposals import ProposalParams  # noqa: E402

SIDES = ("query", "reference", "train")


def encoders(cfg: PipelineConfig) -> list[tuple[Encoder, int]]:
    """(encoder, batch size) per feature key; one runtime per card, as a model actor holds them."""
    forwards, out = {}, []
    for key in key_specs(cfg, RunDir("/nonexistent")):
        if key.card.name not in forwards:
            forwards[key.card.name] = runtime(key.card, "cpu")
        out.append((Encoder(key.card.name, key.pre, forwards[key.card.name], key.card.dim), key.batch_size))
    for enc, _ in out:  # first calls allocate; not part of the steady cost
        enc.embed([Image.new("RGB", (320, 240))])
    return out


def side_seconds(cfg: PipelineConfig, side: str, images: list[tuple[str, str]],
                 encs: list[tuple[Encoder, int]]) -> tuple[float, float]:
    """(CPU-seconds per image, patches per image) to plan and embed ``images`` as ``side``."""
    views = getattr(cfg.patches, side)
    detector = resolve_detector(views.detector, cfg.registry)
    t0 = time.process_time()
    plan, _ = plan_images(images, views, detector, ProposalParams(conf=views.detector_conf))
    rows = plan.to_pylist()
    paths = dict(images)
    patches: list = []
    for image_id in dict.fromkeys(r["image_id"] for r in rows):
        img = load_rgb(paths[image_id])
        patches += [cut_patch(img, (r["x0"], r["y0"], r["x1"], r["y1"]), r["rotation"], r["flip"])
                    for r in rows if r["image_id"] == image_id]
        if len(patches) >= 64 or image_id == rows[-1]["image_id"]:
            for enc, bs in encs:
                for i in range(0, len(patches), bs):
                    enc.embed(patches[i:i + bs])
            patches = []
    return (time.process_time() - t0) / len(images), len(rows) / len(images)


def verify_seconds(cfg: PipelineConfig, pairs: pa.Table, queries: str, references: str, limit: int,
                   top_k: int) -> float:
    """CPU-seconds per query to verify the ``top_k`` best ``pairs`` of the first ``limit`` queries
    against ``references`` (0 when verify is off)."""
    if not cfg.verify.enabled:
        return 0.0
    first = sorted(set(pairs.column("query_id").to_pylist()))[:limit]
    pairs = pairs.filter(np.isin(np.asarray(pairs.column("query_id").to_pylist(), dtype=object), first))
    pairs = top_k_per_query(pairs, top_k)
    t0 = time.process_time()
    verify_pairs(pairs, dict(list_images(queries)), dict(list_images(references)), top_k, load_rgb,
                 scorer=scorer_for(cfg.verify.method, cfg))  # built as the stage builds it
    return (time.process_time() - t0) / len(first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="+")
    p.add_argument("--queries", required=True)
    p.add_argument("--references", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--predictions", help="a run's predictions.csv on --queries (for verification)")
    p.add_argument("--decoys", help="a run's fused_decoys.parquet on --queries and --train (fuse.threshold auto)")
    p.add_argument("--limit", type=int, default=40, help="images per side (default 40)")
    p.add_argument("--set", action="append", default=[], help="override applied to every config")
    args = p.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    threadpool_limits(1)  # one BLAS thread (the SIFT matcher's distances), as in a Ray task
    folders = {"query": args.queries, "reference": args.references, "train": args.train}
    sizes = {s: len(list_images(f)) for s, f in folders.items()}
    print(f"CPU-seconds per image, 1 thread, first {args.limit} images per side; minidisc = per query + "
          f"(references {sizes['reference']} x ref + train {sizes['train']} x train) / {sizes['query']} queries")
    head = f"{'config':28s} {'q patches':>9s} {'query':>7s} {'verify':>7s} {'decoys':>7s} {'per query':>9s} " \
           f"{'reference':>9s} {'train':>7s} {'minidisc':>9s}"
    print(head)
    for path in args.configs:
        cfg = load_config(path, args.set)
        try:
            encs = encoders(cfg)
        except RegistryError as e:  # one config's missing model should not lose the others' figures
            print(f"{os.path.basename(path):28s} skipped: {e}", flush=True)
            continue
        per = {s: side_seconds(cfg, s, list_images(folders[s], args.limit), encs) for s in SIDES}
        v = verify_seconds(cfg, read_predictions(args.predictions), args.queries, args.references, args.limit,
                           cfg.verify.top_k) \
            if args.predictions else float("nan")
        d = 0.0  # decoys are verified only for fuse.threshold auto; nan: no --decoys to time them on
        if cfg.decoys():
            d = verify_seconds(cfg, read_table(args.decoys), args.queries, args.train, args.limit,
                               decoy_depth(cfg.verify)) \
                if args.decoys else float("nan")
        per_query = per["query"][0] + v + d
        total = per_query + (sizes["reference"] * per["reference"][0] + sizes["train"] * per["train"][0]) \
            / sizes["query"]
        print(f"{os.path.basename(path):28s} {per['query'][1]:9.1f} {per['query'][0]:7.3f} {v:7.3f} {d:7.3f} "
              f"{per_query:9.3f} {per['reference'][0]:9.3f} {per['train'][0]:7.3f} {total:9.3f}", flush=True)


if __name__ == "__main__":
    main()
