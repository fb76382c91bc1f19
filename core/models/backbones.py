"""Backbone registry: a name -> timm trunk, wrapped as a :class:`DescriptorModel`.

A descriptor model is trunk -> pooling -> optional linear projection -> L2 normalisation.
Backbones are always created with random weights (``pretrained=False``: machines are
offline); trained weights come from a local file via ``build_backbone(..., checkpoint=path)``.

Example::

    model = build_backbone("resnet50", dim=256).eval()
    x = (images - torch.tensor(model.mean)[:, None, None]) / torch.tensor(model.std)[:, None, None]
    descriptors = model(x)            # B x 256, unit norm
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from core.models.checkpoint import load_weights
from core.models.ibn import resnet50_ibn_a
from core.models.layers import GeM, TokenPool

TrunkBuilder = Callable[[int | None], nn.Module]  # img_size -> timm trunk without pool/head

# Pooling choices: name -> factory(trunk). CNN trunks give B x C x H x W, ViTs B x N x C.
POOLS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "gem": lambda trunk: GeM(p=3.0, learnable=True),
    "gem_fixed": lambda trunk: GeM(p=3.0, learnable=False),
    "gem_grid2": lambda trunk: GeM(p=3.0, learnable=True, grid=2),  # 2 x 2 regions, 4x the size
    "cls": lambda trunk: TokenPool("cls", trunk.num_prefix_tokens),
    "mean": lambda trunk: TokenPool("mean", trunk.num_prefix_tokens),
}
CNN_POOLS = ("gem", "gem_fixed", "gem_grid2")
TOKEN_POOLS = ("cls", "mean")


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: its trunk builder and the pools that fit it (first = default)."""

    builder: TrunkBuilder
    pools: tuple[str, ...]


_BACKBONES: dict[str, BackboneEntry] = {}


def register_backbone(
    name: str, *, pools: tuple[str, ...] = CNN_POOLS
) -> Callable[[TrunkBuilder], TrunkBuilder]:
    """Decorator: register ``fn(img_size) -> trunk`` under ``name``."""

    def deco(fn: TrunkBuilder) -> TrunkBuilder:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = BackboneEntry(fn, pools)
        return fn

    return deco


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered backbone names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _BACKBONES if fnmatch.fnmatchcase(n, pattern))


def _timm_trunk(arch: str, **kwargs: Any) -> nn.Module:
    """A random-init timm model without classifier or global pool (returns unpooled features)."""
    return timm.create_model(arch, pretrained=False, num_classes=0, global_pool="", **kwargs)


def _timm_cnn(arch: str, img_size: int | None) -> nn.Module:
    return _timm_trunk(arch)  # fully convolutional: img_size is only the nominal input size


def _timm_vit(arch: str, img_size: int | None) -> nn.Module:
    # dynamic_img_size interpolates the position embedding, so any input scale works.
    sized = {} if img_size is None else {"img_size": img_size}
    return _timm_trunk(arch, dynamic_img_size=True, **sized)


# copydet name -> timm architecture. "tiny_*" are test-sized (~0.3M params) CPU models.
_TIMM_CNNS = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "resnet152": "resnet152",
    "tiny_cnn": "test_resnet",
}
_TIMM_VITS = {
    "vit_ti16": "vit_tiny_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_b16": "vit_base_patch16_224",
    "tiny_vit": "test_vit",
}
for _name, _arch in _TIMM_CNNS.items():
    register_backbone(_name)(partial(_timm_cnn, _arch))
for _name, _arch in _TIMM_VITS.items():
    register_backbone(_name, pools=TOKEN_POOLS)(partial(_timm_vit, _arch))


@register_backbone("r50_ibn_a")
def _r50_ibn_a(img_size: int | None) -> nn.Module:
    return resnet50_ibn_a(num_classes=0, global_pool="")


class DescriptorModel(nn.Module):
    """trunk -> pool -> projection (optional) -> L2 norm; ``forward(x) -> B x dim``.

    ``x`` is a float ``B x 3 x H x W`` batch normalised with ``mean`` / ``std`` (the trunk's
    timm defaults). ``config()`` holds the :func:`build_backbone` arguments that rebuild it.
    """

    def __init__(
        self, trunk: nn.Module, *, name: str, pool: str, dim: int | None, img_size: int, seed: int
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.pool = POOLS[pool](trunk)
        pooled = self.pool.out_features(trunk.num_features)
        self.proj = nn.Identity() if dim is None else nn.Linear(pooled, dim)
        self.name = name
        self.pool_name = pool
        self.proj_dim = dim
        self.dim: int = pooled if dim is None else dim
        self.img_size = img_size
        self.seed = seed
        cfg = trunk.pretrained_cfg
        self.mean: tuple[float, float, float] = tuple(float(v) for v in cfg["mean"])
        self.std: tuple[float, float, float] = tuple(float(v) for v in cfg["std"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.pool(self.trunk.forward_features(x))), dim=-1)

    def config(self) -> dict[str, Any]:
        """Keyword arguments for :func:`build_backbone` that rebuild this architecture."""
        return {
            "name": self.name,
            "pool": self.pool_name,
            "dim": self.proj_dim,
            "img_size": self.img_size,
            "seed": self.seed,
        }


def build_backbone(
    name: str,
    *,
    dim: int | None = None,
    checkpoint: str | Path | None = None,
    img_size: int | None = None,
    pool: str | None = None,
    seed: int = 0,
) -> DescriptorModel:
    """Build the registered backbone ``name`` as a descriptor model.

    dim: projection size (None: no projection, the trunk's feature size).
    checkpoint: local weights, ours or a plain timm/torchvision state dict (see
        :func:`core.models.checkpoint.load_weights`).
    img_size: nominal input size (ViTs size their position embedding to it; default: timm's).
    pool: one of the backbone's pools (default: GeM for CNNs, class token for ViTs).
    seed: random init runs under this seed in a forked RNG, so an untrained backbone is the
        same in every process (query and reference features must come from one model).
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}")
    entry = _BACKBONES[name]
    pool = entry.pools[0] if pool is None else pool
    if pool not in entry.pools:
        raise ValueError(f"pool {pool!r} does not fit backbone {name!r}; choose from {entry.pools}")
    if dim is not None and dim < 1:
        raise ValueError(f"dim must be a positive int or None, got {dim}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = entry.builder(img_size)
        size = img_size if img_size is not None else int(trunk.pretrained_cfg["input_size"][-1])
        model = DescriptorModel(trunk, name=name, pool=pool, dim=dim, img_size=size, seed=seed)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model
