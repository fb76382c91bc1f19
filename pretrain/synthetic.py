"""Synthetic evaluation splits cut from unlabeled training photos, never from evaluation data.

Held-out train photos become references and recipe-edited copies become queries, with a
ground truth that is known by construction. ``copydet tune`` picks settings on such a split
and the is-copy threshold is calibrated on one, so no choice ever looks at the benchmark.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.imageio import ImageDecodeError, list_images, load_rgb
from core.store import atomic_dir, join
from pretrain.photos import usable
from pretrain.recipes import FULL_STRENGTH_EPOCH, Recipe, RecipeError, get_recipe

log = logging.getLogger(__name__)

DEFAULT_PHOTOS = 400  # held-out train photos when none is given (at most half of train/)
QUERY_JPEG_QUALITY = 90


@dataclass(frozen=True)
class SplitSpec:
    """How a synthetic split is cut: ``photos`` held-out train photos edited with ``recipe``
    (``heavy+severe``: the copies take the named recipes in turn)."""

    photos: int | None = None
    recipe: str = "basic"
    seed: int = 0
    background: int | None = None  # train photos kept for normalisation (None: all the rest)


@dataclass(frozen=True)
class Split:
    """An ISC21-layout evaluation split on disk, and a line saying where it came from."""

    queries: str
    ground_truth: str
    references: str
    train: str | None
    description: str
    limit: int | None = None


def _spec_record(spec: SplitSpec, train_folder: str) -> dict[str, Any]:
    return {**asdict(spec), "train": os.path.realpath(train_folder)}


def _paths(out_dir: str, record: dict) -> Split:
    train = join(out_dir, "train")
    desc = (f"synthetic: {record['photos']} held-out photos of {record['train']} "
            f"(recipe {record['recipe']}, seed {record['seed']}) in {out_dir}")
    return Split(join(out_dir, "queries"), join(out_dir, "ground_truth.csv"), join(out_dir, "references"),
                 train if os.listdir(train) else None, desc)


def make_synthetic_split(train_folder: str, out_dir: str, spec: SplitSpec) -> Split:
    """A validation split made from training photos only; deterministic in ``spec.seed``.

    ``photos`` train photos are held out: half become references, and recipe copies of half of
    those are the positive queries (the rest are distractor references); recipe edits of the
    other half are negative queries (their originals are nowhere in the split). The remaining
    train photos are the normalisation background (symlinked). Held-out photos must decode and be
    large enough to edit, as in training; a copy the recipe still fails on is left out, and the
    log names its file. The split appears atomically with a ``split.json``; a later call with the
    same spec reuses it.
    """
    photos, out_dir = list_images(train_folder), os.path.abspath(out_dir)
    n = spec.photos if spec.photos is not None else min(DEFAULT_PHOTOS, len(photos) // 2)
    if not 2 <= n < len(photos):
        raise ValueError(f"synthetic split: --photos must be in [2, {len(photos) - 1}] for the {len(photos)} "
                         f"photos of {train_folder}, got {n}")
    record = _spec_record(replace(spec, photos=n), train_folder)
    if _made_before(out_dir, record):
        log.info(f"synthetic split: reusing the validation split in {out_dir}")
        return _paths(out_dir, record)

    recipes = [get_recipe(name) for name in spec.recipe.split("+")]  # an unknown name fails before any decoding
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(photos))
    held, used = _hold_out(photos, order, n, train_folder)
    rest = order[used:] if spec.background is None else order[used:used + spec.background]
    background = [photos[i] for i in rest]
    with atomic_dir(out_dir) as tmp:
        gt = _write_split(tmp, held, background, recipes, spec.seed, rng)
        Path(tmp, "split.json").write_text(json.dumps(record, indent=2))
    copies = sum(not row.endswith(",") for row in gt[1:])
    log.info(f"synthetic split: {n // 2} references, {len(gt) - 1} queries ({copies} copies), "
             f"{len(background)} background photos -> {out_dir}")
    return _paths(out_dir, record)


def _made_before(out_dir: str, record: dict) -> bool:
    """Whether ``out_dir`` holds the split ``record`` describes; an error if it holds anything else."""
    marker = join(out_dir, "split.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            old = json.load(f)
        if old != record:
            raise ValueError(f"{out_dir} holds a split made with {old}, not {record}; "
                             "remove it or use another folder")
        return True
    if os.path.exists(out_dir):
        raise ValueError(f"{out_dir} exists but has no split.json; remove it or use another folder")
    return False


def _hold_out(photos: list[tuple[str, str]], order: np.ndarray, n: int,
              train_folder: str) -> tuple[list[tuple[str, str]], int]:
    """The first ``n`` usable photos in ``order``, and how many of ``order`` that took. Only
    checked here; decoded again when edited, to keep memory flat."""
    held, used = [], 0
    for i in order:
        if len(held) == n:
            break
        used += 1
        try:
            usable(load_rgb(photos[i][1]), photos[i][1])
            held.append(photos[i])
        except ImageDecodeError as e:
            log.warning(f"synthetic split: skipping train photo {photos[i][1]}: {e.reason}")
    if len(held) < n:
        raise ValueError(f"synthetic split: only {len(held)} of the photos in {train_folder} decode at a usable "
                         f"size; need {n}")
    return held, used


def _write_split(tmp: str, held: list[tuple[str, str]], background: list[tuple[str, str]], recipes: list[Recipe],
                 seed: int, rng: np.random.Generator) -> list[str]:
    """Write references, queries and background links of the split into ``tmp``; the ground-truth
    rows (also written), header first."""
    for sub in ("references", "queries", "train"):
        os.makedirs(join(tmp, sub))
    n_refs = len(held) // 2
    queries = []  # (source image id, path, reference id or "" for a negative)
    for j, (image_id, path) in enumerate(held[:n_refs]):
        ref_id = f"R{j:05d}"
        shutil.copyfile(path, join(tmp, "references", ref_id + Path(path).suffix.lower()))
        if j < (n_refs + 1) // 2:
            queries.append((image_id, path, ref_id))
    queries += [(image_id, path, "") for image_id, path in held[n_refs:]]
    gt = ["query_id,reference_id"]
    for q, at in enumerate(rng.permutation(len(queries))):
        image_id, path, ref_id = queries[at]
        recipe = recipes[at % len(recipes)]  # in turn over copies and negatives alike
        try:
            copy = recipe(load_rgb(path), seed=seed, key=image_id, epoch=FULL_STRENGTH_EPOCH)
        except RecipeError as e:
            log.warning(f"synthetic split: no query from train photo {path}: {e}")
            continue
        copy.save(join(tmp, "queries", f"Q{q:05d}.jpg"), quality=QUERY_JPEG_QUALITY)
        gt.append(f"Q{q:05d},{ref_id}")
    for image_id, path in background:
        link = Path(tmp, "train", image_id + Path(path).suffix)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.realpath(path))
    Path(tmp, "ground_truth.csv").write_text("\n".join(gt) + "\n")
    return gt
