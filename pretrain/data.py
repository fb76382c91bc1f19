"""Training data: recipe copies of streamed photos as model input, per-rank loaders.

Nothing is decoded up front: item ``i`` of :class:`CopyViews` decodes photo ``i`` from its
file (:class:`~pretrain.photos.LazyPhotos`, shrunk to ``max_side``: augmenting a 4000 px photo
to train at 224 px wastes the CPU), makes ``K`` recipe copies of it and turns them into model
input with the card's :class:`~core.models.preprocess.Preprocess`, the same function
extraction uses. The photo's index is its label: two views for BYOL, ``K`` positives for
instance fine-tuning. The sampler shards the indices per rank, and loader workers decode
ahead into a bounded queue (``prefetch_factor`` batches each).

Example::

    files = PhotoFiles.from_folder("train/", limit=64)
    pre = Preprocess.for_card(card, 64)
    ds = CopyViews(LazyPhotos(files, max_side=128), get_recipe("basic"), views=2, pre=pre, seed=0)
    loader = make_loader(ds, batch_size=8)
    for views, labels in loader:   # views: B x 2 x 3 x 64 x 64
        ...
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from core.models.preprocess import Preprocess
from pretrain.photos import LazyPhotos
from pretrain.recipes import OpContext, Recipe


def model_input(pre: Preprocess, images: Sequence[Image.Image]) -> torch.Tensor:
    """``len(images) x ...`` model input of decoded images, through the card's preprocessing."""
    return torch.from_numpy(pre.to_input(np.stack([pre.resize(im) for im in images])))


class PhotoEpochs(Dataset):
    """Items made from photo ``i`` at the current epoch; call :meth:`set_epoch` before each
    epoch. The epoch lives in shared memory, so loader workers can stay alive across epochs."""

    def __init__(self, photos: LazyPhotos) -> None:
        self.photos = photos
        self.ctx = OpContext(backgrounds=photos)  # paste onto other training photos, decoded when drawn
        # shared memory: persistent loader workers see the epoch the trainer sets
        self._epoch = mp.Value("i", 0, lock=False)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __len__(self) -> int:
        return len(self.photos)


class CopyViews(PhotoEpochs):
    """Item ``i`` = (``views x 3 x H x W`` model input of recipe copies of photo ``i``, label ``i``).

    Copies depend on (seed, photo id, epoch, view) only (the recipe's intensity schedule and
    the random draws follow the epoch).
    """

    def __init__(
        self,
        photos: LazyPhotos,
        recipe: Recipe,
        *,
        views: int,
        pre: Preprocess,
        seed: int,
    ) -> None:
        super().__init__(photos)
        self.recipe = recipe
        self.views = views
        self.pre = pre
        self.seed = seed

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Copies of photo ``i``, labelled ``i``; of its replacement (and label) if ``i`` does not decode or edit."""
        index, copies = self.photos.edited(i, lambda _, photo: [
            self.recipe(photo.image, seed=self.seed, key=photo.image_id, epoch=self.epoch, view=v, ctx=self.ctx)
            for v in range(self.views)
        ])
        return model_input(self.pre, copies), index


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> DataLoader:
    """A shuffling loader over this rank's shard (DistributedSampler when world_size > 1).

    Batches are full (``drop_last``) so BatchNorm and in-batch mining always see ``batch_size``.
    Call ``loader.sampler.set_epoch(e)`` (see :func:`set_loader_epoch`) for a new order.
    """
    if len(dataset) < batch_size * world_size:
        raise ValueError(
            f"{len(dataset)} training photos are fewer than one batch ({batch_size} x {world_size} workers)"
        )
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """New shuffle order and augmentation epoch; call before iterating the epoch."""
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
