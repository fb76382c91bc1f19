"""Manifest rows -> patch rows (the ``patches`` contract of DESIGN.md)."""
from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from ensemble.store import PATCHES_SCHEMA
from patchers.views import View, ViewConfig, plan_views


def patch_rows(image_id: str, views: list[View]) -> list[dict]:
    """One row per view; patch ids follow plan order, so patch 0 is the full image."""
    return [{"image_id": image_id, "patch_id": i, "kind": v.kind,
             "x0": v.box[0], "y0": v.box[1], "x1": v.box[2], "y1": v.box[3],
             "rotation": v.rotation, "flip": v.flip, "source_score": v.score}
            for i, v in enumerate(views)]


def plan_table(image_ids: Iterable[str], cfg: ViewConfig) -> pa.Table:
    """Patch table for images whose views do not depend on their pixels."""
    views = plan_views(cfg)
    rows = [r for image_id in image_ids for r in patch_rows(image_id, views)]
    return pa.Table.from_pylist(rows, schema=PATCHES_SCHEMA)
