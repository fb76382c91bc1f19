"""A recipe: a named list of augmentation steps with a progressive-intensity schedule.

A training set is the unlabeled photos plus one recipe. Each step applies one family from
:data:`core.augment.families.OPS` with a probability and a strength range; the schedule scales
the top of every range from ``start`` (epoch 0) to 1 (after ``ramp_epochs``) so training sees
mild copies first. The output depends only on (seed, image key, epoch, view).

Example::

    recipe = Recipe("demo", (Step("crop", 1.0, (0.2, 0.8)), Step("jpeg", 0.5)))
    copy = recipe(photo, seed=0, key="T00001", epoch=3)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from core.augment import OPS, OpContext


FULL_STRENGTH_EPOCH = 10**6  # past any schedule's ramp: edits at full strength
VALIDATION_SEED = 7_919  # validation copies differ from every training copy (training uses spec.seed)


class RecipeError(RuntimeError):
    """An op of a recipe failed on an image (the message names the recipe, op and image size)."""


@dataclass(frozen=True)
class Schedule:
    """intensity(epoch) = start + (1 - start) * min(1, epoch / ramp_epochs)."""

    start: float = 0.3
    ramp_epochs: int = 5

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= 1.0:
            raise ValueError(f"schedule start must be in [0, 1], got {self.start}")
        if self.ramp_epochs < 0:
            raise ValueError(f"schedule ramp_epochs must be >= 0, got {self.ramp_epochs}")

    def __call__(self, epoch: int) -> float:
        if self.ramp_epochs == 0:
            return 1.0
        return self.start + (1.0 - self.start) * min(1.0, max(epoch, 0) / self.ramp_epochs)


@dataclass(frozen=True)
class Step:
    """Apply op ``op`` with probability ``p`` at a strength drawn from ``strength``."""

    op: str
    p: float = 1.0
    strength: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown augmentation op {self.op!r}; known: {', '.join(sorted(OPS))}")
        lo, hi = self.strength
        if not (0.0 <= self.p <= 1.0 and 0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"step {self.op!r}: need 0 <= p <= 1 and 0 <= lo <= hi <= 1")


def image_key(key: int | str) -> int:
    """A stable integer for an image id (Python's ``hash`` of a str changes per process)."""
    return key if isinstance(key, int) else zlib.crc32(key.encode())


@dataclass(frozen=True)
class Recipe:
    """Named steps applied in order; ``max_ops`` caps how many fire on one image."""

    name: str
    steps: tuple[Step, ...]
    schedule: Schedule = field(default_factory=Schedule)
    max_ops: int | None = None

    def intensity(self, epoch: int) -> float:
        return self.schedule(epoch)

    def rng(self, seed: int, key: int | str, epoch: int, view: int = 0) -> np.random.Generator:
        """The generator for one (image, epoch, view): independent streams, reproducible."""
        return np.random.default_rng([seed, image_key(key), max(epoch, 0), view, zlib.crc32(self.name.encode())])

    def __call__(
        self,
        img: Image.Image,
        *,
        seed: int,
        key: int | str,
        epoch: int,
        view: int = 0,
        ctx: OpContext | None = None,
    ) -> Image.Image:
        """An RGB copy of ``img`` edited by this recipe at this epoch's intensity."""
        rng = self.rng(seed, key, epoch, view)
        ctx = ctx or OpContext()
        top = self.intensity(epoch)
        fire = [s for s in self.steps if rng.random() < s.p]
        if self.max_ops is not None and len(fire) > self.max_ops:
            keep = np.sort(rng.choice(len(fire), self.max_ops, replace=False))
            fire = [fire[i] for i in keep]
        out = img.convert("RGB")
        for step in fire:
            lo, hi = step.strength
            strength = lo + (hi - lo) * top * float(rng.random())
            try:
                out = OPS[step.op](out, strength, rng, ctx).convert("RGB")
            except Exception as e:  # name the failing family: AugLy errors are terse
                raise RecipeError(f"recipe {self.name!r}: op {step.op!r} failed on a {out.size} image: {e}") from e
        return out
