"""Pieces both training loops share: photos split, mixed precision, events log, registration."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pretrain.backbones import DescriptorModel
from pretrain.checkpoint import save_checkpoint, sidecar_path
from pretrain.data import Photo, list_images, load_photos
from pretrain.registry import ModelCard, card_for_model, register
from pretrain.train_config import RunSpec


def split_photos(spec: RunSpec) -> tuple[list[Photo], list[Photo], list[Photo]]:
    """(train, validation references, validation distractors), a fixed split by ``spec.seed``."""
    photos = load_photos(list_images(spec.data.train, spec.data.limit), spec.data.max_side)
    held = spec.data.val_photos + spec.data.val_distractors
    if len(photos) - held < 2:
        raise ValueError(
            f"{spec.data.train}: {len(photos)} photos leave fewer than 2 to train on after holding "
            f"aside {held} for validation"
        )
    order = np.random.default_rng(spec.seed).permutation(len(photos))
    val = [photos[i] for i in order[: spec.data.val_photos]]
    distractors = [photos[i] for i in order[spec.data.val_photos : held]]
    train = [photos[i] for i in sorted(order[held:])]
    return train, val, distractors


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bfloat16 autocast on a GPU (no loss scaling needed); full precision on the CPU."""
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


def maybe_crash(spec: RunSpec, epoch: int) -> None:
    """Test hook: kill this worker process once at ``fault.epoch`` (a marker file makes it once),
    ``fault.after_s`` seconds into the epoch. Ray Train V2 collects reports on its health
    check (every 2 s): a worker that dies sooner after a report loses that checkpoint."""
    if spec.fault is None or epoch != spec.fault["epoch"]:
        return
    marker = Path(spec.fault["marker"])
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"killed pid {os.getpid()} at epoch {epoch}\n")
    time.sleep(float(spec.fault.get("after_s", 0)))
    os._exit(1)


def log_event(spec: RunSpec, rank: int, record: dict[str, Any]) -> None:
    """Append ``record`` to ``<run_dir>/events.jsonl`` (rank 0): the run's progress log."""
    if rank != 0:
        return
    path = Path(spec.run_dir) / "events.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")


def run_card(spec: RunSpec, model: DescriptorModel, **fields: Any) -> ModelCard:
    """The model card of this run's model (weights filled in at registration)."""
    return card_for_model(model, name=spec.name, trained_on=spec.recipe, **fields)


def register_model(spec: RunSpec, model: DescriptorModel, card: ModelCard, weights: Path | None = None) -> Path:
    """Copy the weights (``weights`` or ``model``'s own) next to the card in the registry and
    write the card; returns the card path. The card is written last: it marks a finished run."""
    registry = Path(spec.registry)
    target = registry / f"{spec.name}.safetensors"
    if weights is None:
        save_checkpoint(model, target, meta=card.model_dump(include={"trained_on", "loss", "metrics"}))
    else:
        registry.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, target)
        shutil.copyfile(sidecar_path(weights), sidecar_path(target))
    return register(card.model_copy(update={"weights": str(target.resolve())}), registry)
