"""Validation during fine-tuning: μAP on synthetic copies of held-aside photos.

References are the held-aside photos; queries are one recipe copy of every reference (at
full intensity) plus one copy of every distractor photo (which has no reference). Queries
are fixed for the whole run, so epochs are comparable. Pixels become model input exactly as
in extraction: references are decoded in full by :func:`core.imageio.load_rgb` and prepared
by the card's :class:`~core.models.preprocess.Preprocess`; queries are copies of the photo
decoded at ``max_side``, like the training copies. Scoring is the pipeline's own: faiss kNN
(``core.knn.knn``) and the ISC21 evaluator (``core.metrics.evaluate``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from core.imageio import ImageDecodeError, load_rgb
from core.knn import knn
from core.metrics import Metrics, evaluate
from core.models.backbones import DescriptorModel
from core.models.preprocess import Preprocess
from pretrain.photos import PhotoFiles, load_usable, usable
from pretrain.recipes import FULL_STRENGTH_EPOCH, VALIDATION_SEED, OpContext, Recipe, RecipeError

log = logging.getLogger(__name__)


@dataclass
class ValidationSet:
    """Validation images, resized but kept as ``n x H x W x 3`` uint8 (a quarter of the float
    input, made a batch at a time), and the ground truth that pairs them."""

    references: np.ndarray
    reference_ids: list[str]
    queries: np.ndarray
    query_ids: list[str]
    ground_truth: list[tuple[str, str]]
    pre: Preprocess

    def model_input(self, pixels: np.ndarray) -> torch.Tensor:
        """Resized uint8 pixels as model input, exactly as extraction prepares them."""
        return torch.from_numpy(self.pre.to_input(pixels))


def make_validation_set(
    references: PhotoFiles, distractors: PhotoFiles, recipe: Recipe, *,
    pre: Preprocess, max_side: int, backgrounds: Sequence[Image.Image] = (),
) -> ValidationSet:
    """Copy queries of ``references`` and of ``distractors`` made with ``recipe``; photos that
    do not decode, are too small or thin to train on, or that the recipe fails on are logged and
    left out. Decodes one photo at a time."""
    if not len(references):
        raise ValueError("validation needs at least one held-aside reference photo (data.val_photos)")
    ctx = OpContext(backgrounds=backgrounds)
    refs: list[np.ndarray] = []
    ref_ids: list[str] = []
    queries: list[np.ndarray] = []
    query_ids: list[str] = []
    for files, is_reference in ((references, True), (distractors, False)):
        for image_id, path in files:
            try:
                full = usable(load_rgb(path), path) if is_reference else None
                small = load_usable(path, max_side)
                copy = recipe(small, seed=VALIDATION_SEED, key=image_id, epoch=FULL_STRENGTH_EPOCH, ctx=ctx)
            except (ImageDecodeError, RecipeError) as e:
                log.warning("skipping validation image %s: %s", path, e)
                continue
            if full is not None:
                refs.append(pre.resize(full))
                ref_ids.append(image_id)
            queries.append(pre.resize(copy))
            query_ids.append(f"Q-{image_id}")
    if not refs:
        raise ValueError(f"none of the {len(references)} validation reference photos could be decoded")
    return ValidationSet(
        references=np.stack(refs), reference_ids=ref_ids, queries=np.stack(queries), query_ids=query_ids,
        ground_truth=[(f"Q-{i}", i) for i in ref_ids], pre=pre,
    )


@torch.no_grad()
def describe(model: DescriptorModel, val: ValidationSet, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Descriptors of resized ``pixels`` in eval mode (``n x dim`` float32), input made per batch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(val.model_input(pixels[i : i + batch_size]).to(device)).float().cpu()
           for i in range(0, len(pixels), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy()


def validate(model: DescriptorModel, val: ValidationSet, k: int = 10) -> Metrics:
    """ISC21 metrics of ``model`` on ``val`` (top ``k`` references per query)."""
    scores, idx = knn(describe(model, val, val.queries), describe(model, val, val.references), k)
    q = np.repeat(np.asarray(val.query_ids, dtype=object), scores.shape[1])
    r = np.asarray(val.reference_ids, dtype=object)[idx.ravel()]
    return evaluate(val.ground_truth, q, r, scores.ravel())
