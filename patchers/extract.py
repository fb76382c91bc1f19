"""Extraction's two halves: decode once and cut (CPU), then run the models (model actors).

A *chunk* is a run of whole images of one patch shard, about ``chunk_patches`` patches long.
:func:`decode_chunk` decodes each image once, cuts its patches and resizes every patch for
every (model, scale) feature key with that key's card-driven
:class:`~core.models.preprocess.Preprocess`; a key's patches travel as one uint8 buffer plus
their shapes (:func:`pack`). :class:`ChunkEmbedder` (one per model actor) holds every key's
model, unpacks and embeds, and writes one feature file per key and chunk, so the driver only
ever sees counts. Both are plain Python, usable and tested without Ray.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from core.contracts import ERRORS_SCHEMA, chunk_file
from core.imageio import ImageDecodeError, load_rgb
from core.models.cards import ModelCard
from core.models.encoders import Encoder
from core.models.preprocess import Preprocess, resized_size
from core.models.registry import weights_hash
from core.models.runtimes import Forward, runtime
from core.store import features_table, join, read_table, write_table

log = logging.getLogger(__name__)

ROTATIONS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
             270: Image.Transpose.ROTATE_270}


def cut_patch(img: Image.Image, box: tuple[float, float, float, float], rotation: int = 0,
              flip: bool = False) -> Image.Image:
    """Crop a fractional box, mirror it, then rotate it counter-clockwise by ``rotation``."""
    w, h = img.size
    x0, y0 = int(box[0] * w), int(box[1] * h)
    x1, y1 = max(int(round(box[2] * w)), x0 + 1), max(int(round(box[3] * h)), y0 + 1)
    patch = img.crop((x0, y0, x1, y1))
    if flip:
        patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rotation:
        patch = patch.transpose(ROTATIONS[int(rotation)])
    return patch


def pack(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``H x W x 3`` uint8 patches -> (one flat uint8 buffer, ``n x 3`` shapes)."""
    shapes = np.array([a.shape for a in arrays], np.int32).reshape(-1, 3)
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.uint8)
    return flat.astype(np.uint8, copy=False), shapes


def unpack(flat: np.ndarray, shapes: np.ndarray) -> list[np.ndarray]:
    """The inverse of :func:`pack` (views into ``flat``)."""
    ends = np.cumsum(np.prod(shapes, axis=1)) if len(shapes) else np.zeros(0, int)
    return [flat[e - int(np.prod(s)):e].reshape(s) for s, e in zip(shapes.tolist(), ends.tolist())]


@dataclass(frozen=True)
class ChunkTask:
    """One chunk to extract: patch rows ``[start, stop)`` of ``shard`` for the keys in ``keys``."""

    shard: str
    index: int
    start: int
    stop: int
    keys: tuple[int, ...]

    @property
    def file(self) -> str:
        return chunk_file(self.shard, self.index)


def draft_sides(cols: dict[str, list], sizes: dict[str, tuple[int, int]], pres: Sequence[Preprocess]) -> dict[str, int]:
    """Per image of a chunk (patch ``cols``, full ``sizes``): the longer side to decode it at so
    that no patch is enlarged for any of ``pres`` (a JPEG decodes at 1/2..1/8 size when that is
    far below its own, see :func:`core.imageio.load_rgb`)."""
    need: dict[str, float] = {}
    for i, image_id in enumerate(cols["image_id"]):
        w, h = sizes[image_id]
        pw, ph = max((cols["x1"][i] - cols["x0"][i]) * w, 1.0), max((cols["y1"][i] - cols["y0"][i]) * h, 1.0)
        if int(cols["rotation"][i]) in (90, 270):
            pw, ph = ph, pw
        for pre in pres:
            tw, th = resized_size((max(1, round(pw)), max(1, round(ph))), pre.rule, pre.scale, pre.bucket)
            need[image_id] = max(need.get(image_id, 0.0), tw / pw, th / ph)
    return {i: math.ceil(f * max(sizes[i])) for i, f in need.items()}


PATCH_COLUMNS = ("image_id", "patch_id", "x0", "y0", "x1", "y1", "rotation", "flip")


def patch_columns(rows: pa.Table) -> dict[str, list]:
    """The columns of a patch table that cutting needs, as Python lists."""
    return {c: rows.column(c).to_pylist() for c in PATCH_COLUMNS}


def resize_patch(img: Image.Image, cols: dict[str, list], i: int, pres: Sequence[Preprocess],
                 pixels: dict[int, list[np.ndarray]]) -> None:
    """Cut patch row ``i`` of ``cols`` from ``img`` and append its pixels for every key in ``pixels``."""
    box = (cols["x0"][i], cols["y0"][i], cols["x1"][i], cols["y1"][i])
    patch = cut_patch(img, box, int(cols["rotation"][i]), bool(cols["flip"][i]))
    for k, out in pixels.items():
        out.append(pres[k].resize(patch))


def decode_chunk(task: ChunkTask, patches_dir: str, manifest_dir: str,
                 pres: Sequence[Preprocess], max_pixels: int | None = None) -> dict:
    """Decode each image of the chunk once (at the size its patches need, at most ``max_pixels``)
    and cut/resize its patches for the task's keys.

    Returns the chunk's row: ``image_id``/``patch_id`` of the patches cut, ``errors`` (one line
    per image that no longer decodes: its patches are left out), and per key ``k`` the packed
    pixels ``px<k>``/``shape<k>`` (empty for keys not in ``task.keys``).
    """
    rows = read_table(join(patches_dir, task.shard)).slice(task.start, task.stop - task.start)
    manifest = read_table(join(manifest_dir, task.shard), columns=["image_id", "path", "width", "height"])
    ids = manifest.column("image_id").to_pylist()
    paths = dict(zip(ids, manifest.column("path").to_pylist()))
    sizes = dict(zip(ids, zip(manifest.column("width").to_pylist(), manifest.column("height").to_pylist())))
    cols = patch_columns(rows)
    sides = draft_sides(cols, sizes, [pres[k] for k in task.keys])
    out_ids, out_patches, errors = [], [], []
    pixels: dict[int, list[np.ndarray]] = {k: [] for k in task.keys}
    current, img = None, None
    for i, image_id in enumerate(cols["image_id"]):
        if image_id != current:
            current = image_id
            try:
                img = load_rgb(paths[image_id], draft_side=sides.get(image_id), max_pixels=max_pixels)
            except ImageDecodeError as e:
                img = None
                errors.append(str(e))
        if img is None:
            continue
        out_ids.append(image_id)
        out_patches.append(int(cols["patch_id"][i]))
        resize_patch(img, cols, i, pres, pixels)
    row = {"file": task.file, "planned": task.stop - task.start, "keys": list(task.keys), "image_id": out_ids,
           "patch_id": out_patches, "errors": errors}
    for k in range(len(pres)):
        row[f"px{k}"], row[f"shape{k}"] = pack(pixels.get(k, []))
    return row


@dataclass(frozen=True)
class KeySpec:
    """One (model, scale) feature key: its card, pixels, precision, and where it is written."""

    card: ModelCard
    pre: Preprocess
    folder: str  # features/<key>/
    model: str  # the model name written in the feature rows
    scale: int
    dtype: str = "float32"  # stored embedding type
    precision: str = "float32"  # compute type on a GPU (autocast)
    batch_size: int = 32


def pick_device(use_gpu: bool) -> str:
    """``cuda`` when the actor was given a GPU and torch sees one; else ``cpu`` (with a log
    line when a GPU was asked for but none is visible, e.g. a fake GPU in a test cluster)."""
    if use_gpu and torch.cuda.is_available():
        return "cuda"
    if use_gpu:
        log.warning("a GPU was requested but torch sees none; this actor runs on the CPU")
    return "cpu"


def build_encoders(keys: Sequence[KeySpec], device: str = "cpu") -> list[Encoder]:
    """One encoder per key; keys of one card (and precision) at several scales share one model."""
    forwards: dict[tuple[str, str], Forward] = {}
    encoders = []
    for key in keys:
        shared = (key.card.name, key.precision)
        if shared not in forwards:
            forwards[shared] = runtime(key.card, device, key.precision)
            weights_hash(key.card)  # loaded what the run pinned: not a file replaced since (models import --force)
        encoders.append(Encoder(key.card.name, key.pre, forwards[shared], key.card.dim))
    return encoders


def embed_batched(enc: Encoder, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """Descriptors of resized patches, ``batch_size`` patches per model call."""
    if not len(arrays):
        return np.zeros((0, enc.dim), np.float32)
    return np.concatenate([enc.embed_arrays(arrays[i:i + batch_size]) for i in range(0, len(arrays), batch_size)])


class ChunkEmbedder:
    """The model actor: every key's encoder, and the writer of every key's feature files.

    Called on one chunk row at a time (Ray Data ``map_batches(batch_size=1)``); returns the
    chunk's counts only. Encoders of one card at several scales share one model.
    """

    def __init__(self, keys: Sequence[KeySpec], errors_dir: str, use_gpu: bool = False,
                 num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.encoders = build_encoders(keys, pick_device(use_gpu))
        self.keys, self.errors_dir = list(keys), errors_dir

    def embed(self, row: dict) -> dict:
        """Embed and write one decoded chunk row; returns ``{file, planned, patches, errors}``."""
        if row["errors"]:  # written first: a chunk's feature files mark it done
            lines = sorted(set(row["errors"]))
            write_table(pa.Table.from_pylist([{"path": e.split(":", 1)[0], "error": e} for e in lines],
                                             schema=ERRORS_SCHEMA),
                        join(self.errors_dir, f"extract-{row['file']}"))
        for k in row["keys"]:
            key = self.keys[k]
            emb = embed_batched(self.encoders[k], unpack(row[f"px{k}"], row[f"shape{k}"]), key.batch_size)
            table = features_table(row["image_id"], row["patch_id"], key.model, key.scale, emb, key.dtype)
            write_table(table, join(key.folder, row["file"]))
        return {"file": row["file"], "planned": row["planned"], "patches": len(row["patch_id"]),
                "errors": len(row["errors"])}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data entry point: a numpy batch of chunk rows -> their counts."""
        done = [self.embed(_row(batch, i)) for i in range(len(batch["file"]))]
        return {name: np.array([d[name] for d in done]) for name in ("file", "planned", "patches", "errors")}


def _row(batch: dict[str, np.ndarray], i: int) -> dict:
    """Row ``i`` of a Ray Data numpy batch as plain values (lists and arrays)."""
    def value(v: object) -> object:
        return list(v) if isinstance(v, np.ndarray) and v.dtype == object else v
    return {name: value(col[i]) for name, col in batch.items()}
