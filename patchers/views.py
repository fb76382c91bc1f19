"""Geometric views of an image: the boxes a patch plan is made of.

A view is a box in fractions of the (EXIF-upright) image plus a rotation and a flip.
Each kind of view is a small generator in the ``VIEWS`` registry, driven by one field of
:class:`ViewConfig`; a plan is the full image (always patch 0) followed by every enabled
generator's views, deduplicated and capped at ``max_patches``. Input resolutions ("scales")
are not views: every patch is embedded at each of a model's scales (``features.scale``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from core.yamlconf import ConfigModel

Box = tuple[float, float, float, float]
FULL: Box = (0.0, 0.0, 1.0, 1.0)
Fraction = float


@dataclass(frozen=True)
class View:
    kind: str
    box: Box = FULL
    rotation: int = 0
    flip: bool = False
    score: float = 1.0


class ViewConfig(ConfigModel):
    """Which views to cut from each image of one side (queries, references or train)."""

    preset: str | None = Field(None, description="start from a named preset (PRESETS), then apply the keys given")
    rotations: list[Literal[90, 180, 270]] = []
    flip: bool = False
    center_crops: list[Fraction] = Field([], description="side fraction of centred crops")
    corner_crops: list[Fraction] = Field([], description="side fraction of the 4 corner crops")
    grids: list[int] = Field([], description="n for n x n tiles")
    center_tiles: list[Fraction] = Field([], description="side fraction of centred (overlapping) tiles")
    proposals: int = Field(0, ge=0, description="selective-search region budget per image; 0 = none")
    detector: str | None = Field(None, description="registry name of a copy-region detector; None = none")
    detector_conf: float = Field(0.25, gt=0, lt=1, description="keep detections scoring at least this")
    max_patches: int = Field(64, ge=1)

    def whole_only(self) -> bool:
        """True when this side's only patch is the whole image."""
        return self.proposals == 0 and self.detector is None and len(plan_views(self)) == 1

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
            return {**PRESETS[name], **data}
        return data

    @field_validator("center_crops", "corner_crops", "center_tiles")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0.0 < f < 1.0]
        if bad:
            raise ValueError(f"fractions must be in (0, 1), got {bad}")
        return v

    @field_validator("grids")
    @classmethod
    def _grids(cls, v: list[int]) -> list[int]:
        if any(n < 2 or n > 8 for n in v):
            raise ValueError(f"grid sizes must be between 2 and 8, got {v}")
        return v

    @model_validator(mode="after")
    def _views_fit(self) -> ViewConfig:
        """The cap trims proposals and detections; views asked for by name are never dropped silently."""
        n = len(distinct_views(self))
        if n > self.max_patches:
            raise ValueError(f"the views asked for make {n} patches an image (the full image included), more "
                             f"than max_patches {self.max_patches}: raise max_patches or ask for fewer views")
        return self


# D2LV-style budgets; every key can be overridden next to ``preset`` in the config.
FIVE_CENTRES = (0.9, 0.8, 0.7, 0.6, 0.5)
PRESETS: dict[str, dict[str, Any]] = {
    "global": {},
    # FINDINGS.md: crop views carry most of the gain; rotations/flips are opt-in.
    "crops": {"center_crops": [0.7, 0.5], "corner_crops": [0.6]},
    # queries: full, 3 rotations, flip, 5 centre crops (10 patches)
    "fast": {"rotations": [90, 180, 270], "flip": True, "center_crops": list(FIVE_CENTRES)},
    # references: full + 2x2 grid (5 patches)
    "ref_fast": {"grids": [2]},
    # queries: full, 3 rotations, 5 centre crops, then detections and up to 100 proposals
    "d2lv": {"rotations": [90, 180, 270], "center_crops": list(FIVE_CENTRES), "proposals": 100,
             "max_patches": 128},
    # references, 19 patches: full, 2x2, 3x3 and 5 nested (overlapping) centre tiles
    "ref_d2lv": {"grids": [2, 3], "center_tiles": list(FIVE_CENTRES)},
}

ViewFn = Callable[[ViewConfig], list[View]]
VIEWS: dict[str, ViewFn] = {}


def register_view(name: str) -> Callable[[ViewFn], ViewFn]:
    def deco(fn: ViewFn) -> ViewFn:
        VIEWS[name] = fn
        return fn
    return deco


def centred(side: float) -> Box:
    m = (1.0 - side) / 2
    return (m, m, 1.0 - m, 1.0 - m)


@register_view("rotations")
def _rotations(cfg: ViewConfig) -> list[View]:
    return [View("rotation", rotation=r) for r in cfg.rotations]


@register_view("flip")
def _flip(cfg: ViewConfig) -> list[View]:
    return [View("full", flip=True)] if cfg.flip else []


@register_view("center_crops")
def _center_crops(cfg: ViewConfig) -> list[View]:
    return [View("crop", centred(s)) for s in cfg.center_crops]


@register_view("corner_crops")
def _corner_crops(cfg: ViewConfig) -> list[View]:
    out = []
    for s in cfg.corner_crops:
        for x0, y0 in ((0, 0), (1 - s, 0), (0, 1 - s), (1 - s, 1 - s)):
            out.append(View("crop", (x0, y0, x0 + s, y0 + s)))
    return out


@register_view("grids")
def _grids(cfg: ViewConfig) -> list[View]:
    return [View("tile", (i / n, j / n, (i + 1) / n, (j + 1) / n))
            for n in cfg.grids for j in range(n) for i in range(n)]


@register_view("center_tiles")
def _center_tiles(cfg: ViewConfig) -> list[View]:
    return [View("tile", centred(s)) for s in cfg.center_tiles]


def distinct_views(cfg: ViewConfig, extra: list[View] = ()) -> list[View]:
    """Full image first, then each registered generator's views, then ``extra`` (e.g.
    proposals); exact duplicates dropped."""
    out, seen = [], set()
    for v in [View("full"), *(v for fn in VIEWS.values() for v in fn(cfg)), *extra]:
        key = (tuple(round(c, 4) for c in v.box), v.rotation, v.flip)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def plan_views(cfg: ViewConfig, extra: list[View] = ()) -> list[View]:
    """:func:`distinct_views`, at most ``cfg.max_patches`` (the config's own views always fit)."""
    return distinct_views(cfg, extra)[: cfg.max_patches]
