"""The extract stage vs the raw forward of the same model on the same patches, in one run.

For each model key: the run folder's patches are decoded, cut and resized into memory first
(untimed), then the bare encoder forward over them is timed (``raw``); then the whole extract
stage (decode tasks, model actor, feature files) is timed on the same run folder. The ratio
raw / stage says how much of the stage's time is the model itself (1.0: no overhead).

    COPYDET_REGISTRY=/path/to/models python bench/extract_throughput.py --images ../shared/bench/minidisc-dev/references --limit 200
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from core.contracts import plan_chunks
from core.store import read_table
from jobs.config import load_config
from jobs.layout import RunDir, shard_names
from jobs.pipeline import run_stages
from jobs.stages.extract import key_specs
from patchers.extract import ChunkTask, decode_chunk, unpack

ROOT = Path(__file__).resolve().parent.parent


def patches_in_memory(run: RunDir, pres: list, chunk: int) -> list[list]:
    """Every patch of the run, resized for each key (what the model actors receive)."""
    out = [[] for _ in pres]
    keys = tuple(range(len(pres)))
    for shard in shard_names(run.patches):
        ids = read_table(f"{run.patches}/{shard}", columns=["image_id"]).column("image_id").to_pylist()
        for i, (a, b) in enumerate(plan_chunks(ids, chunk)):
            row = decode_chunk(ChunkTask(shard, i, a, b, keys), run.patches, run.manifest, pres)
            for k in keys:
                out[k].extend(unpack(row[f"px{k}"], row[f"shape{k}"]))
    return out


def raw_forward(key, arrays: list, batch: int) -> float:
    """Seconds of the bare encoder forward over ``arrays`` (after one warm-up batch)."""
    from core.models.encoders import Encoder
    from core.models.runtimes import runtime
    enc = Encoder(key.card.name, key.pre, runtime(key.card, "cpu"), key.card.dim)
    enc.embed_arrays(arrays[:batch])
    t0 = time.perf_counter()
    for i in range(0, len(arrays), batch):
        enc.embed_arrays(arrays[i:i + batch])
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default=str(ROOT / "bench" / "sample" / "references"), help="folder of photos")
    p.add_argument("--limit", type=int, default=200, help="photos used")
    p.add_argument("--models", default="{name: sscd, scales: [224], batch_size: 32};"
                                       "{name: resnet50, scales: [224], batch_size: 32}",
                   help="model entries (YAML flow mappings) separated by ';'")
    p.add_argument("--views", default="global", help="patch preset of the photos (global: one patch each)")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        for entry in args.models.split(";"):
            out = Path(tmp) / "run"
            shutil.rmtree(out, ignore_errors=True)
            cfg = load_config(None, [f"output={out}", "data.root=null", f"data.references={args.images}",
                                     f"data.limit={args.limit}", f"patches.reference.preset={args.views}",
                                     f"models=[{entry}]", "search.normalize.enabled=false"])
            run = RunDir(cfg.output)
            run_stages(cfg, ["manifest", "patch"])
            key = key_specs(cfg, run)[0]
            arrays = patches_in_memory(run, [key.pre], cfg.extract.chunk_patches)[0]
            raw = raw_forward(key, arrays, key.batch_size)
            t0 = time.perf_counter()
            run_stages(cfg, ["extract"])
            stage = time.perf_counter() - t0
            name = os.path.basename(key.folder)
            print(f"{name}: {len(arrays)} patches on {os.cpu_count()} cores; raw forward {len(arrays) / raw:.1f} "
                  f"patches/s, extract stage {len(arrays) / stage:.1f} patches/s, ratio {raw / stage:.2f}", flush=True)


if __name__ == "__main__":
    main()
