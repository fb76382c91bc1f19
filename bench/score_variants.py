"""Score-level variants of one run's descriptor, unverified, against ground truth (analysis only).

    python bench/score_variants.py RUN_FOLDER GROUND_TRUTH [--key sscd@192] [--smoothed] \
        [--gammas 0.25,0.5,1] [--dims 128,256,384]

Reads one feature key of a finished run (its query, reference and train shards, all in memory: a
minidisc-sized run) and ranks each query's references by the max over their views of the view
pair's similarity less the query view's best train similarity (the search stage's per-view
normalisation, beta 1, by exact search), each query's best 10 kept. Then the same with:

- reference-side normalisation: each reference view's own best train similarity, times gamma,
  subtracted too (a hubness correction: a reference like many photos is discounted);
- PCA of the descriptors, with and without whitening, fit on the train descriptors;
- ``--smoothed``: one more query view, the whole image Gaussian-blurred (radius 1/192 of its
  longer side) or scaled down to 64 px on its shorter side, embedded by the run's model and max-ed in.

Prints μAP / R@P90 / R@1 / R@10 per variant. None of these is used by copydet: the README says why.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import pyarrow.compute as pc
from PIL import Image, ImageFilter

from core.imageio import load_rgb
from core.metrics import evaluate, read_ground_truth
from core.store import embeddings_from_arrow, join, list_shards, read_shards
from ensemble.normalize import neighbour_similarity
from ensemble.reduce import fit_pca
from jobs.config import load_config
from jobs.layout import RunDir, paths_of
from jobs.stages.extract import key_specs
from patchers.embed import ImageEmbedder
from patchers.views import ViewConfig

TOP = 10
SMOOTHINGS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "blurred": lambda im: im.filter(ImageFilter.GaussianBlur(max(im.size) / 192)),
    "64 px": lambda im: im.resize((max(1, round(im.width * 64 / min(im.size))),
                                   max(1, round(im.height * 64 / min(im.size)))), Image.BILINEAR),
}


class Side:
    """One split's view descriptors (unit length), rows grouped by image."""

    def __init__(self, run: RunDir, key: str, split: str) -> None:
        rows = read_shards(list_shards(run.features(key), f"{split}-"), ["image_id", "embedding"])
        rows = rows.take(pc.sort_indices(rows, [("image_id", "ascending")]))
        ids = np.asarray(rows.column("image_id").to_pylist())
        self.images, self.starts = np.unique(ids, return_index=True)
        self.x = unit(embeddings_from_arrow(rows.column("embedding")))


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def image_scores(views: np.ndarray, q_starts: np.ndarray, r_starts: np.ndarray) -> np.ndarray:
    """Query image x reference image: the max over their views' scores."""
    return np.maximum.reduceat(np.maximum.reduceat(views, q_starts, axis=0), r_starts, axis=1)


def report(label: str, scores: np.ndarray, q: Side, r: Side, gt: list[tuple[str, str]]) -> None:
    top = np.argsort(-scores, axis=1)[:, :TOP]
    m = evaluate(gt, np.repeat(q.images, top.shape[1]), r.images[top].ravel(),
                 np.take_along_axis(scores, top, axis=1).ravel())
    print(f"{label:<28} μAP {m.micro_ap:.4f}  R@P90 {m.recall_at_p90:.4f}  R@1 {m.recall_at_1:.4f}  "
          f"R@10 {m.recall_at_10:.4f}", flush=True)


def normalised(qx: np.ndarray, rx: np.ndarray, tx: np.ndarray, gamma: float = 0.0) -> np.ndarray:
    """View-pair similarities less the query view's best train similarity (the search stage's
    :func:`~ensemble.normalize.neighbour_similarity`), and ``gamma`` x the reference view's."""
    out = qx @ rx.T - neighbour_similarity(qx, tx)[:, None]
    return out - gamma * neighbour_similarity(rx, tx)[None, :] if gamma else out


def smoothed_views(run: RunDir, key: str, images: np.ndarray, smooth: Callable) -> np.ndarray:
    """The run's ``key`` descriptor of each query image, whole and smoothed (rows in ``images`` order)."""
    spec = next(s for s in key_specs(load_config(join(run.root, "config.yaml")), run) if s.folder == run.features(key))
    embedder = ImageEmbedder([spec], ViewConfig(preset=None))
    files = paths_of(run, "query", images.tolist())
    out = []
    for i in range(0, len(images), 32):
        batch = [(q, smooth(load_rgb(files[q]))) for q in images[i:i + 32]]
        out.append(embeddings_from_arrow(embedder.embed(batch)[0].column("embedding")))
    return unit(np.concatenate(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("ground_truth")
    ap.add_argument("--key", default="sscd@192", help="a feature folder of the run")
    ap.add_argument("--gammas", default="0.25,0.5,1")
    ap.add_argument("--dims", default="128,256,384")
    ap.add_argument("--smoothed", action="store_true", help="embed smoothed query views (minutes on a CPU)")
    args = ap.parse_args()
    run, gt = RunDir(args.run), read_ground_truth(args.ground_truth)
    q, r, t = (Side(run, args.key, split) for split in ("query", "reference", "train"))
    print(f"{args.key}: {len(q.images)} queries ({len(q.x)} views), {len(r.images)} references ({len(r.x)}), "
          f"{len(t.images)} train photos ({len(t.x)})")
    base = image_scores(normalised(q.x, r.x, t.x), q.starts, r.starts)
    report("per-view normalisation", base, q, r, gt)
    for gamma in (float(g) for g in args.gammas.split(",")):
        report(f"+ reference side, gamma {gamma:g}", image_scores(normalised(q.x, r.x, t.x, gamma), q.starts, r.starts),
               q, r, gt)
    for dim in (int(d) for d in args.dims.split(",")):
        for whiten in (False, True):
            pca = fit_pca(t.x, dim, whiten)
            views = normalised(pca.apply(q.x), pca.apply(r.x), pca.apply(t.x))
            report(f"PCA {dim}{' whitened' if whiten else ''}", image_scores(views, q.starts, r.starts), q, r, gt)
    if args.smoothed:
        for name, smooth in SMOOTHINGS.items():
            extra = image_scores(normalised(smoothed_views(run, args.key, q.images, smooth), r.x, t.x),
                                 np.arange(len(q.images)), r.starts)
            report(f"{name} view alone", extra, q, r, gt)
            report(f"+ {name} view", np.maximum(base, extra), q, r, gt)


if __name__ == "__main__":
    main()
