"""Embed decoded images in-process: the per-image twin of extraction's two halves.

The query service and ``copydet index add`` see a handful of images at a time, already in
memory, where extraction sees shards of files on Ray. :class:`ImageEmbedder` runs the same
pieces on them: the side's patch plan (:func:`patchers.plan.plan_decoded`), the cut and
card-driven resize of every patch for every key (:func:`patchers.extract.resize_patch`) and
the encoders built from the same :class:`~patchers.extract.KeySpec` list
(:func:`patchers.extract.build_encoders`, :func:`patchers.extract.embed_batched`). Given the
images' sources (file or bytes), a JPEG is decoded again at the reduced size the extract stage
decodes it at (:func:`patchers.extract.draft_sides`), so an image embedded here gets the
descriptors extraction writes for it.

Example::

    emb = ImageEmbedder(keys, ViewConfig(preset="crops"))
    tables = emb.embed([("q1", load_rgb("q1.jpg"))])   # one features table per key
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from core.contracts import PATCHES_SCHEMA
from core.imageio import decode_rgb, load_rgb
from core.store import features_table
from patchers.extract import (KeySpec, build_encoders, draft_sides, embed_batched, patch_columns, pick_device,
                              resize_patch)
from patchers.plan import DetectorSpec, plan_decoded
from patchers.proposals import ProposalParams
from patchers.views import ViewConfig


class ImageEmbedder:
    """Every key's encoder plus one side's views, for images already decoded."""

    def __init__(self, keys: Sequence[KeySpec], views: ViewConfig, detector: DetectorSpec | None = None,
                 use_gpu: bool = False, num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.keys, self.views, self.detector = list(keys), views, detector
        self.params = ProposalParams(conf=views.detector_conf)
        self.encoders = build_encoders(self.keys, pick_device(use_gpu))

    def plan(self, images: Sequence[tuple[str, Image.Image]]) -> pa.Table:
        """The patch table of ``images`` (the same rows the patch stage writes for them)."""
        return pa.Table.from_pylist(plan_decoded(images, self.views, self.detector, self.params),
                                    schema=PATCHES_SCHEMA)

    def at_draft_size(self, decoded: dict[str, Image.Image], cols: dict[str, list],
                      sources: Mapping[str, str | bytes]) -> dict[str, Image.Image]:
        """``decoded`` with each image whose patches need at most half its size decoded again from
        its source at the size the extract stage decodes it at (a no-op resize for non-JPEGs)."""
        sides = draft_sides(cols, {i: im.size for i, im in decoded.items()}, [k.pre for k in self.keys])
        out = dict(decoded)
        for image_id, side in sides.items():
            src = sources.get(image_id)
            if src is not None and math.ceil(max(decoded[image_id].size) / 2) >= side:
                out[image_id] = (decode_rgb(src, image_id, draft_side=side) if isinstance(src, bytes)
                                 else load_rgb(src, draft_side=side))
        return out

    def embed(self, images: Sequence[tuple[str, Image.Image]], timings: dict[str, float] | None = None,
              sources: Mapping[str, str | bytes] | None = None) -> list[pa.Table]:
        """One features table per key (rows in patch-plan order) for decoded ``(image_id, image)``
        pairs (``sources``: their files or bytes, see :meth:`at_draft_size`); ``timings`` (if
        given) gets the seconds spent on ``views`` and ``model``."""
        t0 = time.perf_counter()
        rows = self.plan(images)
        cols = patch_columns(rows)
        decoded = self.at_draft_size(dict(images), cols, sources) if sources else dict(images)
        pixels: dict[int, list[np.ndarray]] = {k: [] for k in range(len(self.keys))}
        for i, image_id in enumerate(cols["image_id"]):
            resize_patch(decoded[image_id], cols, i, [k.pre for k in self.keys], pixels)
        t1 = time.perf_counter()
        tables = [features_table(cols["image_id"], cols["patch_id"], key.model, key.scale,
                                 embed_batched(enc, pixels[k], key.batch_size), key.dtype)
                  for k, (key, enc) in enumerate(zip(self.keys, self.encoders))]
        if timings is not None:
            timings["views"] = timings.get("views", 0.0) + t1 - t0
            timings["model"] = timings.get("model", 0.0) + time.perf_counter() - t1
        return tables
