"""Validation during fine-tuning: μAP on synthetic copies of held-aside photos.

References are the held-aside photos; queries are one recipe copy of every reference (at
full intensity) plus one copy of every distractor photo (which has no reference). Queries
are fixed for the whole run, so epochs are comparable. Scoring is the pipeline's own: faiss
kNN (``core.knn.knn``) and the ISC21 evaluator (``core.metrics.evaluate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.knn import knn
from core.metrics import Metrics, evaluate
from core.models.backbones import DescriptorModel
from pretrain.data import Photo, to_tensor
from pretrain.recipes import OpContext, Recipe

FULL_INTENSITY_EPOCH = 10**6  # past any schedule's ramp
VALIDATION_SEED = 7_919  # queries differ from every training copy (training uses spec.seed)


@dataclass
class ValidationSet:
    """Preprocessed validation tensors and the ground truth that pairs them."""

    references: torch.Tensor
    reference_ids: list[str]
    queries: torch.Tensor
    query_ids: list[str]
    ground_truth: list[tuple[str, str]]


def make_validation_set(
    references: Sequence[Photo], distractors: Sequence[Photo], recipe: Recipe, *,
    size: int, mean: Sequence[float], std: Sequence[float], backgrounds: Sequence[Photo] = (),
) -> ValidationSet:
    """Copy queries of ``references`` and of ``distractors`` made with ``recipe``."""
    if not references:
        raise ValueError("validation needs at least one held-aside reference photo (data.val_photos)")
    ctx = OpContext(backgrounds=tuple(p.image for p in backgrounds))

    def copy(photo: Photo) -> torch.Tensor:
        img = recipe(photo.image, seed=VALIDATION_SEED, key=photo.image_id, epoch=FULL_INTENSITY_EPOCH, ctx=ctx)
        return to_tensor(img, size, mean, std)

    queries = [*references, *distractors]
    return ValidationSet(
        references=torch.stack([to_tensor(p.image, size, mean, std) for p in references]),
        reference_ids=[p.image_id for p in references],
        queries=torch.stack([copy(p) for p in queries]),
        query_ids=[f"Q-{p.image_id}" for p in queries],
        ground_truth=[(f"Q-{p.image_id}", p.image_id) for p in references],
    )


@torch.no_grad()
def describe(model: DescriptorModel, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Descriptors of a preprocessed batch in eval mode (``n x dim`` float32)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy()


def validate(model: DescriptorModel, val: ValidationSet, k: int = 10) -> Metrics:
    """ISC21 metrics of ``model`` on ``val`` (top ``k`` references per query)."""
    scores, idx = knn(describe(model, val.queries), describe(model, val.references), k)
    q = np.repeat(np.asarray(val.query_ids, dtype=object), scores.shape[1])
    r = np.asarray(val.reference_ids, dtype=object)[idx.ravel()]
    return evaluate(val.ground_truth, q, r, scores.ravel())
