"""Training pairs for the learned verifier: recipe copies of streamed photos, as region tokens,
against the photo itself (a positive) and its nearest neighbours (hard negatives).

The token model is frozen, so what a training photo contributes as a *reference* never
changes: :func:`describe_photos` turns every photo into its region tokens once (the photos
themselves are decoded one at a time; the training run keeps them on disk,
:mod:`pretrain.photo_arrays`), and :func:`nearest_others` finds each photo's nearest other
photos by a global descriptor (:func:`embed_photos`) with the faiss kNN. Copies are
new every epoch: item ``i`` of :class:`CopyTokens` decodes photo ``i``, edits it with one of
the set recipes and describes the copy.

Example::

    originals = describe_photos(photos, tokens)
    nbrs = nearest_others(embed_photos(photos, miner, range(len(photos))), k=5)
    ds = CopyTokens(photos, recipes, lambda: tokens, seed=0)
    copy, i = ds[3]        # R x dim tokens of a copy of photo 3; its positive is originals[i]
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from core.knn import knn
from core.metrics import Metrics, evaluate
from core.models.encoders import Encoder
from core.models.verifier import RegionTokens
from pretrain.data import PhotoEpochs
from pretrain.photos import LazyPhotos, Photo
from pretrain.recipes import FULL_STRENGTH_EPOCH, VALIDATION_SEED, OpContext, Recipe


def describe_photos(photos: LazyPhotos, tokens: RegionTokens, rows: range | None = None) -> np.ndarray:
    """``n x R x dim`` region tokens of the photos ``rows`` (default all; a replacement's for one that
    does not decode)."""
    rows = range(len(photos)) if rows is None else rows
    return np.stack([tokens(photos[i]) for i in rows]).astype(np.float32)


def embed_photos(photos: LazyPhotos, miner: Encoder, rows: range, batch: int = 16) -> np.ndarray:
    """``n x dim`` global descriptors of the photos ``rows`` by ``miner``, ``batch`` decoded at a
    time; a zero row for a photo that was replaced (it holds its replacement's pixels)."""
    out = []
    for i in range(rows.start, rows.stop, batch):
        found = [photos.photo(j) for j in range(i, min(i + batch, rows.stop))]
        desc = miner.embed([photo.image for _, photo in found])
        desc[[index != j for j, (index, _) in enumerate(found, i)]] = 0
        out.append(desc)
    return np.concatenate(out)


def nearest_others(desc: np.ndarray, k: int) -> np.ndarray:
    """``n x k`` indices of each row's nearest *other* rows (the faiss kNN), among the rows that
    are not zero: a replaced photo is a copy of its replacement, never its hard negative."""
    own = np.flatnonzero(np.any(desc != 0, axis=1))
    if len(own) < 2:
        raise ValueError(f"mining neighbours needs at least two photos ({len(own)} of {len(desc)} decode)")
    k = min(k, len(own) - 1)
    _, idx = knn(desc, desc[own], k + 1)
    return np.stack([[j for j in own[row] if j != i][:k] for i, row in enumerate(idx)])


def pick_recipe(recipes: Sequence[Recipe], seed: int, index: int, epoch: int) -> Recipe:
    """The recipe of photo ``index``'s copy in ``epoch``: fixed per (seed, photo, epoch)."""
    return recipes[int(np.random.default_rng([seed, index, epoch]).integers(len(recipes)))]


class CopyTokens(PhotoEpochs):
    """Item ``i`` = (``R x dim`` tokens of a recipe copy of photo ``i``, ``i``).

    ``make_tokens`` builds the token model in each process that first needs it (loader
    workers cannot share an ONNX session).
    """

    def __init__(self, photos: LazyPhotos, recipes: Sequence[Recipe], make_tokens: Callable[[], RegionTokens],
                 seed: int) -> None:
        super().__init__(photos)
        self.recipes, self.make_tokens, self.seed = list(recipes), make_tokens, seed
        self._tokens: RegionTokens | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}  # each loader worker builds its own token model

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._tokens is None:
            self._tokens = self.make_tokens()
        index, copy = self.photos.edited(i, self._copy)
        return torch.from_numpy(self._tokens(copy)), index

    def _copy(self, index: int, photo: Photo) -> Image.Image:
        recipe = pick_recipe(self.recipes, self.seed, index, self.epoch)
        return recipe(photo.image, seed=self.seed, key=photo.image_id, epoch=self.epoch, ctx=self.ctx)


def training_pairs(copies: torch.Tensor, index: torch.Tensor, originals: np.ndarray, neighbours: np.ndarray,
                   rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query tokens, candidate tokens, labels) for a batch of copies: each copy against its
    original (1), one of its photo's mined neighbours (0) and another copy's original (0)."""
    idx = index.numpy()
    hard = neighbours[idx, rng.integers(neighbours.shape[1], size=len(idx))]
    other = np.roll(idx, 1)
    cands = torch.from_numpy(originals[np.concatenate([idx, hard, other])])
    labels = torch.cat([torch.ones(len(idx)), torch.zeros(2 * len(idx))])
    return copies.repeat(3, 1, 1), cands, labels


@dataclass
class PairValidation:
    """Fixed validation pairs: copies of held-aside photos against their original and neighbours."""

    queries: np.ndarray  # m x R x dim tokens of the copies
    query_ids: list[str]
    candidates: np.ndarray  # m x c indices into ``references``
    references: np.ndarray  # n x R x dim tokens of the held-aside references
    reference_ids: list[str]
    ground_truth: list[tuple[str, str]]


def make_pair_validation(references: LazyPhotos, distractors: LazyPhotos, recipes: Sequence[Recipe],
                         tokens: RegionTokens, miner: Encoder, k: int) -> PairValidation:
    """Full-strength copies of ``references`` (positives) and ``distractors`` (no original
    anywhere), each paired with its ``k`` nearest references by ``miner`` plus, for a copy of a
    reference, its own original. Photos that do not decode or that a recipe fails on are logged
    and left out (a training replacement would repeat another photo's id)."""
    ctx = OpContext(backgrounds=references)
    found = [references.photo(i) for i in range(len(references))]
    kept = [photo for i, (index, photo) in enumerate(found) if index == i]
    if not kept:
        raise ValueError("verifier validation: none of the held-aside reference photos decode")
    row_of = {photo.image_id: row for row, photo in enumerate(kept)}
    refs = np.stack([tokens(photo.image) for photo in kept]).astype(np.float32)
    ref_desc = miner.embed([photo.image for photo in kept])
    queries, query_ids, rows = [], [], []

    def copy_of(index: int, photo: Photo) -> tuple[Photo, Image.Image]:
        recipe = pick_recipe(recipes, VALIDATION_SEED, index, 0)
        return photo, recipe(photo.image, seed=VALIDATION_SEED, key=photo.image_id, epoch=FULL_STRENGTH_EPOCH,
                             ctx=ctx)

    for source in (references, distractors):
        for i in range(len(source)):
            index, (photo, copy) = source.edited(i, copy_of)
            if index != i:
                continue
            _, near = knn(miner.embed([copy]), ref_desc, min(k, len(kept)))
            own = [row_of[photo.image_id]] if source is references and photo.image_id in row_of else []
            rows.append(own + [j for j in near[0].tolist() if j not in own][: k - len(own)])
            queries.append(tokens(copy))
            query_ids.append(f"Q-{photo.image_id}")
    if not queries:
        raise ValueError("verifier validation: no held-aside photo gives a copy")
    width = max(len(r) for r in rows)
    cands = np.array([r + [r[-1]] * (width - len(r)) for r in rows])
    ref_ids = [photo.image_id for photo in kept]
    made = set(query_ids)
    return PairValidation(np.stack(queries), query_ids, cands, refs, ref_ids,
                          [(f"Q-{i}", i) for i in ref_ids if f"Q-{i}" in made])


def whole_image_cosine(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The baseline score of aligned token batches: the cosine of their whole-image tokens."""
    return (queries[:, 0] * candidates[:, 0]).sum(-1)


def validate_pairs(val: PairValidation, score: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Metrics:
    """ISC21 metrics of the verifier's P(copy) over the validation pairs; ``score(queries,
    candidates)`` scores aligned token batches."""
    m, c = val.candidates.shape
    probs = score(np.repeat(val.queries, c, axis=0), val.references[val.candidates.ravel()])
    q = np.repeat(np.asarray(val.query_ids, dtype=object), c)
    r = np.asarray(val.reference_ids, dtype=object)[val.candidates.ravel()]
    keep = np.r_[True, (q[1:] != q[:-1]) | (r[1:] != r[:-1])]  # padding repeats a candidate
    return evaluate(val.ground_truth, q[keep], r[keep], probs[keep])
