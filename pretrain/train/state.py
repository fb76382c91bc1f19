"""The checkpoint folder one epoch of training leaves behind.

    model.safetensors (+ .json sidecar)  the descriptor model (core.models.checkpoint format);
                                         a verifier run writes verifier.safetensors instead
    card.json                            its model card (what the registry will hold)
    state.pt                             everything else needed to resume: the other modules'
                                         state dicts and the optimiser (read weights_only)
    progress.json                        epoch, global step, metrics, best score so far

``progress.json`` is written last: a folder without it is incomplete and is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.models.backbones import DescriptorModel
from core.models.cards import ModelCard
from core.models.checkpoint import CheckpointError, save_checkpoint

MODEL_FILE = "model.safetensors"


@dataclass
class Resume:
    """What a loop needs to continue from a checkpoint folder."""

    progress: dict[str, Any]
    state: dict[str, Any]


def write_checkpoint(
    folder: Path, *, model: DescriptorModel, card: ModelCard, state: dict[str, Any], progress: dict[str, Any]
) -> None:
    """Save one epoch's checkpoint into ``folder`` (created if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, folder / MODEL_FILE, meta=card.model_dump(include={"trained_on", "loss", "metrics"}))
    write_resume_state(folder, card=card, state=state, progress=progress)


def write_resume_state(folder: Path, *, card: ModelCard, state: dict[str, Any], progress: dict[str, Any]) -> None:
    """The card, resume state and progress of a checkpoint folder whose model file is written
    (``progress.json`` last)."""
    (folder / "card.json").write_text(card.model_dump_json(indent=2) + "\n")
    torch.save(state, folder / "state.pt")
    (folder / "progress.json").write_text(json.dumps(progress, indent=2) + "\n")


def read_checkpoint(folder: Path) -> Resume:
    """Read the resume state of a folder written by :func:`write_checkpoint` into memory (the
    folder may be a temporary download); loads only tensors and plain data."""
    progress_file = folder / "progress.json"
    if not progress_file.is_file():
        raise CheckpointError(folder, "incomplete training checkpoint (no progress.json)")
    progress = json.loads(progress_file.read_text())
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    return Resume(progress=progress, state=state)
