"""The one way pixels become model input, driven by the model card.

Two steps, so that the CPU work and the model work can run in different places:

1. :meth:`Preprocess.resize`: a decoded RGB patch -> ``H x W x 3`` uint8 at the card's resize
   rule (``square``: ``scale x scale``; ``short_side`` / ``long_side``: that side to ``scale``,
   aspect kept), with the card's interpolation. This is all a CPU decode stage ships.
2. :meth:`Preprocess.to_input`: a stack of equal-shape uint8 patches -> what the model takes
   (float ``(x/255 - mean) / std`` or raw uint8; NCHW or NHWC).

Extraction, training validation and the query service all call these, so a model is evaluated
on exactly the pixels it was validated on.

Example::

    pre = Preprocess.for_card(card, scale=224)
    x = pre.to_input(np.stack([pre.resize(patch) for patch in patches]))
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from core.models.cards import ExternalSpec, ModelCard, input_spec

MAX_ASPECT = 8  # an aspect-kept resize stretches the rare image beyond 8:1 to 8:1
INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resized_size(size: tuple[int, int], rule: str, target: int, bucket: int = 0) -> tuple[int, int]:
    """(w, h) after ``rule``: square -> target x target; short_side/long_side -> that side = target.

    ``bucket`` > 0 rounds the other side of an aspect-kept resize to a multiple of ``bucket``, so
    patches of similar aspect share a shape and run as one batch (the aspect moves by at most
    ``bucket / 2`` pixels on that side). No side exceeds :data:`MAX_ASPECT` x ``target``: a
    3000 x 1 image at short side 192 would be a 576,000 px wide input.
    """
    w, h = size
    if rule == "square":
        return target, target
    side = min(w, h) if rule == "short_side" else max(w, h)
    out = [min(MAX_ASPECT * target, max(1, round(x * target / side))) for x in (w, h)]
    if bucket:
        other = 1 if (w <= h) == (rule == "short_side") else 0  # the side not set to target
        out[other] = max(bucket, int(round(out[other] / bucket)) * bucket)
    return out[0], out[1]


@dataclass(frozen=True)
class Preprocess:
    """The resize rule, scale and input format of one (model, scale) feature key."""

    rule: str
    scale: int
    spec: ExternalSpec
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bucket: int = 0

    @classmethod
    def for_card(cls, card: ModelCard, scale: int | None = None, bucket: int = 0) -> Preprocess:
        """The preprocessing of ``card`` at ``scale`` (default: the card's input size)."""
        return cls(card.resize, scale or card.input_size, input_spec(card), tuple(card.mean), tuple(card.std),
                   bucket)

    def resize(self, img: Image.Image) -> np.ndarray:
        """``H x W x 3`` uint8 pixels of ``img`` at this key's size (aspect per the rule)."""
        img = img.convert("RGB")
        size = resized_size(img.size, self.rule, self.scale, self.bucket)
        if size != img.size:
            img = img.resize(size, INTERPOLATION[self.spec.interpolation])
        return np.asarray(img, np.uint8)

    def to_input(self, batch: np.ndarray) -> np.ndarray:
        """A ``B x H x W x 3`` uint8 stack as the model's input array (dtype and layout of the card)."""
        x = batch
        if self.spec.dtype == "float32":
            mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
            x = (x.astype(np.float32) / 255.0 - mean) / std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if self.spec.layout == "nchw" else x)
