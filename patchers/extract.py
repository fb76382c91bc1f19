"""(model, scale) x patches -> embeddings: the Ray Data actor and the pixel work it does.

:class:`Embedder` is a plain class (usable and tested without Ray); Ray Data makes one
per actor via ``map_batches(Embedder, compute=ActorPoolStrategy(...))`` and feeds it
dict-of-numpy batches of patch rows joined with their image path.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from core.imageio import ImageDecodeError, load_rgb
from core.models.encoders import Encoder, load_encoder

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


class Embedder:
    """Embed a batch of patch rows (columns image_id, patch_id, path, x0..y1, rotation,
    flip, plus any pass-through columns such as ``shard``).

    Rows whose image no longer decodes come back with ``error`` set and a zero embedding,
    so the caller can record them and keep going.
    """

    PASS = ("image_id", "patch_id", "shard")

    def __init__(self, model: str, scale: int, dim: int | None = None, registry: str | None = None,
                 num_threads: int | None = None, device: str | None = None, pool: str | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder: Encoder = load_encoder(model, scale, dim=dim, registry=registry, device=device, pool=pool)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        patches, errors = [], []
        cache: dict[str, Image.Image | ImageDecodeError] = {}
        for i, path in enumerate(batch["path"]):
            if path not in cache:
                try:
                    cache[path] = load_rgb(path)
                except ImageDecodeError as e:
                    cache[path] = e
            img = cache[path]
            if isinstance(img, ImageDecodeError):
                errors.append(str(img))
                continue
            box = (batch["x0"][i], batch["y0"][i], batch["x1"][i], batch["y1"][i])
            patches.append(cut_patch(img, box, int(batch["rotation"][i]), bool(batch["flip"][i])))
            errors.append("")
        ok = [i for i, e in enumerate(errors) if not e]
        emb = np.zeros((len(errors), self.encoder.dim), np.float32)
        if ok:
            emb[ok] = self.encoder.embed(patches)
        out = {k: batch[k] for k in self.PASS if k in batch}
        out.update(embedding=emb, error=np.array(errors, dtype=object))
        return out
