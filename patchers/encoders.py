"""Descriptor encoders: a model plus its preprocessing, picked by the model card's kind.

An encoder turns a list of PIL patches into L2-normalised float32 rows. ``ENCODERS`` maps
a card kind to a builder, so new member types (ONNX, TorchScript) are one entry each.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from pretrain.registry import ModelCard, resolve_model


class Encoder(Protocol):
    dim: int

    def embed(self, images: list[Image.Image]) -> np.ndarray: ...


class TorchEncoder:
    """A torch descriptor model fed square ``scale`` x ``scale`` inputs."""

    def __init__(self, model: torch.nn.Module, scale: int, mean, std, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = device
        self.dim = int(model.dim)
        self.transform = T.Compose([
            T.Resize((scale, scale), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.ToTensor(), T.Normalize(mean, std)])

    @torch.inference_mode()
    def embed(self, images: list[Image.Image]) -> np.ndarray:
        x = torch.stack([self.transform(im) for im in images]).to(self.device)
        return self.model(x).float().cpu().numpy()


EncoderBuilder = Callable[[ModelCard, int, str], Encoder]
ENCODERS: dict[str, EncoderBuilder] = {}


def register_encoder(kind: str) -> Callable[[EncoderBuilder], EncoderBuilder]:
    def deco(fn: EncoderBuilder) -> EncoderBuilder:
        ENCODERS[kind] = fn
        return fn
    return deco


@register_encoder("backbone")
def _backbone(card: ModelCard, scale: int, device: str) -> Encoder:
    from pretrain.registry import build_model
    model = build_model(card)
    return TorchEncoder(model, scale, model.mean, model.std, device)


def load_encoder(name: str, scale: int, dim: int | None = None, registry: str | None = None,
                 device: str = "cpu", pool: str | None = None) -> Encoder:
    """Resolve ``name`` (registry name, checkpoint path or backbone name) and build it."""
    card = resolve_model(name, registry, dim=dim, pool=pool)
    if card.kind not in ENCODERS:
        raise ValueError(f"model {name!r}: no encoder for kind {card.kind!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[card.kind](card, scale, device)
import patchers.external  # noqa: E402,F401  (registers kind "external")
