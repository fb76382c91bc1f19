"""copydet's learned verifier: a Reranking Transformer (RRT) over region descriptors of two images.

An image becomes tokens: the descriptors of a fixed set of regions (the whole image, 0.7 centre
and corner crops, a 3 x 3 grid of half-size tiles) from a registered descriptor model, each
with its box. A small transformer reads ``[CLS]`` + the query's tokens + the candidate's
tokens (segment embeddings tell them apart) and predicts copy / non-copy from the class token.
Each token also carries how well it matches the other image (its best cosine, its cosine to
the other whole image, and the box of its best match), so a few CPU-minutes of training learn
to weigh consistent region matches against a single lucky one.

A verifier is registered as a ``verifier`` card: ``build`` holds the architecture and the
token model's name, ``weights`` a safetensors file (never a pickle).

Example::

    v = load_verifier("copydet-verifier")
    q = v.describe(query_image)
    probs = v.score(q, [v.describe(r) for r in candidates])   # P(copy) per candidate
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from core.models.cards import ModelCard, RegistryError
from core.models.checkpoint import CheckpointError
from core.models.encoders import Encoder, build_encoder
from core.models.resolve import resolve_model
from core.store import write_bytes
from core.yamlconf import ConfigModel


def _grid_boxes() -> list[tuple[float, float, float, float]]:
    full = [(0.0, 0.0, 1.0, 1.0)]
    big = [(x, y, x + 0.7, y + 0.7) for x, y in ((0.15, 0.15), (0.0, 0.0), (0.3, 0.0), (0.0, 0.3), (0.3, 0.3))]
    tiles = [(x, y, x + 0.5, y + 0.5) for y in (0.0, 0.25, 0.5) for x in (0.0, 0.25, 0.5)]
    return full + big + tiles


# region set name -> boxes (x0, y0, x1, y1) as fractions of the image; box 0 is the whole image
REGION_SETS: dict[str, list[tuple[float, float, float, float]]] = {
    "grid15": _grid_boxes(),
    "grid6": _grid_boxes()[:6],
}
MATCH_FEATURES = 6  # best cosine, cosine to the other whole image, box of the best match


class VerifierSpec(ConfigModel):
    """What builds a verifier (the card's ``build``, the training config's ``verifier:``): token
    source and transformer size."""

    tokens: str = Field(description="descriptor model (registry name or backbone) that describes the regions")
    scale: int = Field(128, ge=32, description="region side in pixels for the token model")
    regions: str = Field("grid15", description=f"region set, one of {sorted(REGION_SETS)}")
    width: int = Field(128, ge=8)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    ff: int = Field(256, ge=8)
    dropout: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _fits(self) -> VerifierSpec:
        if self.regions not in REGION_SETS:
            raise ValueError(f"regions: unknown region set {self.regions!r}; known: {sorted(REGION_SETS)}")
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width}): each head takes width / heads")
        return self

    def boxes(self) -> np.ndarray:
        return np.asarray(REGION_SETS[self.regions], np.float32)


class PairTransformer(nn.Module):
    """[CLS] + query tokens + candidate tokens -> one copy logit per pair."""

    def __init__(self, dim_in: int, boxes: np.ndarray, spec: VerifierSpec) -> None:
        super().__init__()
        self.register_buffer("boxes", torch.as_tensor(boxes, dtype=torch.float32), persistent=False)
        w = spec.width
        self.proj = nn.Linear(dim_in, w)
        self.box = nn.Linear(4, w)
        self.match = nn.Linear(MATCH_FEATURES, w)
        self.segment = nn.Embedding(2, w)
        self.cls = nn.Parameter(torch.zeros(1, 1, w))
        layer = nn.TransformerEncoderLayer(w, spec.heads, spec.ff, spec.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, 1))

    def _side(self, x: torch.Tensor, sim: torch.Tensor, other_boxes: torch.Tensor, segment: int) -> torch.Tensor:
        """Token embeddings of one side; ``sim`` is this side x the other side's cosines."""
        best, at = sim.max(dim=-1)
        feats = torch.cat([best[..., None], sim[..., :1], other_boxes[at]], dim=-1)
        return self.proj(x) + self.box(self.boxes) + self.match(feats) + self.segment.weight[segment]

    def forward(self, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``q``, ``r``: ``B x N x dim_in`` unit-norm region descriptors; returns ``B`` logits."""
        sim = q @ r.transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(q), -1, -1), self._side(q, sim, self.boxes, 0),
                            self._side(r, sim.transpose(1, 2), self.boxes, 1)], dim=1)
        return self.head(self.encoder(tokens)[:, 0]).squeeze(-1)


class RegionTokens:
    """Image -> ``N x dim`` descriptors of the spec's regions by the token model."""

    def __init__(self, encoder: Encoder, boxes: np.ndarray) -> None:
        self.encoder, self.boxes = encoder, boxes

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def __call__(self, img: Image.Image) -> np.ndarray:
        w, h = img.size
        crops = [img.crop((round(x0 * w), round(y0 * h), max(round(x1 * w), round(x0 * w) + 1),
                           max(round(y1 * h), round(y0 * h) + 1))) for x0, y0, x1, y1 in self.boxes]
        return self.encoder.embed(crops)


def region_tokens(spec: VerifierSpec, registry: str | os.PathLike | None = None, device: str = "cpu") -> RegionTokens:
    """The token maker of ``spec``: its token model at ``spec.scale``, regions batched by shape."""
    card = resolve_model(spec.tokens, registry)
    if card.kind not in ("backbone", "external"):
        raise RegistryError(f"verifier tokens: model {card.name!r} is a {card.kind}, not a descriptor model")
    return RegionTokens(build_encoder(card, spec.scale, device, bucket=32), spec.boxes())  # one shape per image


class Verifier:
    """A registered verifier ready to score pairs: its token maker and transformer (eval mode)."""

    def __init__(self, tokens: RegionTokens, net: PairTransformer) -> None:
        self.tokens, self.net = tokens, net.eval()

    def describe(self, img: Image.Image) -> np.ndarray:
        return self.tokens(img)

    @torch.inference_mode()
    def score(self, query: np.ndarray, candidates: Sequence[np.ndarray]) -> np.ndarray:
        """P(copy) of the query against each candidate (token arrays from :meth:`describe`)."""
        if not len(candidates):
            return np.zeros(0, np.float32)
        device = next(self.net.parameters()).device
        r = torch.from_numpy(np.stack(candidates)).to(device)
        q = torch.from_numpy(query).to(device)[None].expand(len(r), -1, -1)
        return torch.sigmoid(self.net(q, r)).float().cpu().numpy()


def build_net(spec: VerifierSpec, dim_in: int, seed: int = 0) -> PairTransformer:
    """A fresh (random-init, seeded) transformer for ``spec``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PairTransformer(dim_in, spec.boxes(), spec)


def save_verifier(net: PairTransformer, path: str | os.PathLike) -> None:
    """The transformer's weights as safetensors (the card holds the architecture)."""
    write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}))


def verifier_card(name: str, spec: VerifierSpec, token_card: ModelCard, weights: str | None,
                  **fields: Any) -> ModelCard:
    """A ``verifier`` card: the token model's preprocessing at ``spec.scale`` and ``spec`` as build."""
    return ModelCard(name=name, kind="verifier", arch="rrt", weights=weights, input_size=spec.scale,
                     resize=token_card.resize, mean=token_card.mean, std=token_card.std,
                     build=spec.model_dump(), **fields)


def load_verifier(name: str, registry: str | os.PathLike | None = None, device: str = "cpu") -> Verifier:
    """The verifier registered as ``name`` (its token model resolved in the same registry)."""
    card = resolve_model(name, registry)
    if card.kind != "verifier":
        raise RegistryError(f"model {card.name!r} is a {card.kind}, not a verifier")
    if not card.weights:
        raise RegistryError(f"verifier {card.name!r} has no weights")
    spec = VerifierSpec.model_validate(card.build)
    tokens = region_tokens(spec, registry, device)
    net = build_net(spec, tokens.dim)
    try:
        state = load_file(card.weights)
    except (SafetensorError, FileNotFoundError, OSError) as e:
        raise CheckpointError(card.weights, f"cannot read verifier weights ({e})") from e
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(card.weights, f"weights do not fit verifier {card.name!r}: {e}") from e
    return Verifier(tokens, net.to(device))
