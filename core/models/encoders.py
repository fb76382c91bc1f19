"""Encoders: a model card at one scale -> L2-normalised descriptors of image patches.

Every kind of member (copydet backbone, ONNX, TorchScript) is the same :class:`Encoder`: the
card's :class:`~core.models.preprocess.Preprocess` and a runtime's forward function. Patches of
one batch can differ in shape (``short_side``/``long_side`` keep the aspect ratio), so a batch
is split into groups of equal shape and each group runs as one call.

Example::

    enc = load_encoder("resnet18", scale=224)
    rows = enc.embed([patch_a, patch_b])       # 2 x enc.dim, unit norm
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from PIL import Image

from core.knn import l2_normalize
from core.models.cards import ModelCard, RegistryError
from core.models.preprocess import Preprocess
from core.models.resolve import resolve_model
from core.models.runtimes import Forward, runtime


class Encoder:
    """Preprocess patches, run equal-shape groups through ``forward``, L2-normalise the rows."""

    def __init__(self, name: str, pre: Preprocess, forward: Forward, dim: int) -> None:
        self.name, self.pre, self.forward, self.dim = name, pre, forward, dim

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``len(images) x dim`` descriptors of decoded RGB patches."""
        return self.embed_arrays([self.pre.resize(im) for im in images])

    def embed_arrays(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Descriptors of patches already resized by ``self.pre.resize`` (uint8 ``H x W x 3``)."""
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, x in enumerate(arrays):
            groups[x.shape].append(i)
        out = np.empty((len(arrays), self.dim), np.float32)
        for rows in groups.values():
            y = np.asarray(self.forward(self.pre.to_input(np.stack([arrays[i] for i in rows]))))
            if y.shape != (len(rows), self.dim):
                raise RuntimeError(f"model {self.name!r}: expected output ({len(rows)}, {self.dim}), got {y.shape}")
            out[rows] = l2_normalize(y)
        return out


def build_encoder(card: ModelCard, scale: int, device: str = "cpu", bucket: int = 0) -> Encoder:
    """The encoder of a descriptor card at ``scale`` on ``device`` (``bucket``: see
    :func:`~core.models.preprocess.resized_size`)."""
    if card.dim is None:
        raise RegistryError(f"model {card.name!r}: a descriptor card needs dim")
    return Encoder(card.name, Preprocess.for_card(card, scale, bucket), runtime(card, device), card.dim)


def load_encoder(name: str, scale: int, dim: int | None = None, registry: str | None = None,
                 device: str = "cpu", pool: str | None = None) -> Encoder:
    """Resolve ``name`` (registry name, checkpoint path or backbone name) and build its encoder."""
    return build_encoder(resolve_model(name, registry, dim=dim, pool=pool), scale, device)
