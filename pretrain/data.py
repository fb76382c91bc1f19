"""Training data: unlabeled photos in memory, recipe copies as tensors, per-rank loaders.

Photos are decoded once and shrunk to ``max_side`` (augmenting a 4000 px photo to train at
224 px wastes the CPU). :class:`CopyViews` yields ``K`` recipe copies of one photo with the
photo's index as its label: two views for BYOL, ``K`` positives for instance fine-tuning.

Example::

    photos = load_photos(list_images("train/", limit=64), max_side=128)
    ds = CopyViews(photos, get_recipe("basic"), views=2, size=64, mean=m, std=s, seed=0)
    loader = make_loader(ds, batch_size=8)
    for views, labels in loader:   # views: B x 2 x 3 x 64 x 64
        ...
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pretrain.recipes import OpContext, Recipe

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Photo:
    """A decoded training photo and its id (file stem): the id seeds its augmentations."""

    image_id: str
    image: Image.Image


def list_images(folder: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """Image files directly in ``folder``, sorted by name, at most ``limit``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: training image folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files[:limit] if limit else files


def load_photos(paths: Sequence[str | os.PathLike], max_side: int) -> list[Photo]:
    """Decode ``paths`` to RGB, upright (EXIF), longer side at most ``max_side``.

    Files that do not decode are logged with the reason and left out.
    """
    photos = []
    for path in map(Path, paths):
        try:
            with Image.open(path) as im:
                img = ImageOps.exif_transpose(im).convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            log.warning("skipping training image %s: %s", path, e)
            continue
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        photos.append(Photo(path.stem, img))
    if not photos:
        raise ValueError(f"none of the {len(paths)} training images could be decoded")
    return photos


def to_tensor(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``3 x size x size`` float tensor, resized (aspect not kept) and normalised."""
    arr = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class CopyViews(Dataset):
    """Item ``i`` = (``views x 3 x size x size`` recipe copies of photo ``i``, label ``i``).

    Copies depend on (seed, photo id, epoch, view) only; call :meth:`set_epoch` before each
    epoch (the recipe's intensity schedule and the random draws follow the epoch). The epoch
    lives in shared memory, so loader workers can stay alive across epochs.
    """

    def __init__(
        self,
        photos: Sequence[Photo],
        recipe: Recipe,
        *,
        views: int,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int,
        backgrounds: Sequence[Image.Image] = (),
    ) -> None:
        self.photos = list(photos)
        self.recipe = recipe
        self.views = views
        self.size = size
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = seed
        self.ctx = OpContext(backgrounds=tuple(backgrounds) or tuple(p.image for p in self.photos))
        # shared memory: persistent loader workers see the epoch the trainer sets
        self._epoch = mp.Value("i", 0, lock=False)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        photo = self.photos[i]
        copies = [
            self.recipe(photo.image, seed=self.seed, key=photo.image_id, epoch=self.epoch, view=v, ctx=self.ctx)
            for v in range(self.views)
        ]
        return torch.stack([to_tensor(c, self.size, self.mean, self.std) for c in copies]), i


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
