"""Train the copy-region detector (ultralytics YOLO) on synthetic composites and register it.

Steps, each resumable: generate the synthetic set (chunks already written are skipped),
train (resumed from ``last.pt`` when a run was interrupted, skipped when all epochs are in
``results.csv``), export the best checkpoint to ONNX, measure box recall at IoU >= 0.5 (of the
ONNX model, which is what the pipeline runs) and mAP50 on the validation split, and write a
``detector`` model card pointing at the ONNX file. Training is offline: a ``.yaml`` model
definition (random init) or a local ``.pt``, opened with ultralytics' weights-only loading;
never a hub name.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torchvision.ops import box_iou

from core.imageio import list_images, load_rgb
from core.models.cards import ModelCard
from core.models.registry import register
from core.yamlconf import load_as
from patchers.detector.predict import detect, export_onnx, offline_ultralytics
from patchers.detector.synth import chunk_calls, generate_chunk, write_data_yaml

MapFn = Callable[[Callable[..., Any], Sequence[tuple]], list[Any]]


class SynthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: int = Field(2000, ge=1, description="synthetic training images")
    val: int = Field(200, ge=1, description="synthetic validation images (from held-aside photos)")
    side: int = Field(320, ge=32, description="long side of the written images")
    seed: int = 0
    chunk: int = Field(64, ge=1, description="images per generation task")


class DetectorConfig(BaseModel):
    """``configs/detector/*.yaml``: what to train, on what, and where to put it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="registry name of the trained detector")
    photos: str = Field(description="folder of unlabeled training photos")
    limit: int | None = Field(None, ge=1, description="use at most this many photos")
    output: str = Field(description="folder for the synthetic set and the YOLO run")
    registry: str | None = Field(None, description="model registry folder (default: $COPYDET_REGISTRY or models/)")
    synth: SynthConfig = SynthConfig()
    model: str = Field("yolov8n.yaml", description="ultralytics model .yaml (random init) or a local .pt")
    epochs: int = Field(30, ge=1)
    imgsz: int = Field(320, ge=32)
    batch: int = Field(16, ge=1)
    device: str = "cpu"
    conf: float = Field(0.25, gt=0, lt=1, description="confidence threshold of the box-recall measure")

    @field_validator("model")
    @classmethod
    def _local_model(cls, v: str) -> str:
        if v.endswith(".pt") and not Path(v).is_file():
            raise ValueError(f"{v}: no such weights file (devices are offline: only local .pt files)")
        if not v.endswith((".pt", ".yaml", ".yml")):
            raise ValueError(f"{v}: expected an ultralytics model .yaml or a local .pt")
        return v


def load_detector_config(path: str, overrides: list[str] = ()) -> DetectorConfig:
    """Read and validate a detector YAML; errors name the file and the key."""
    return load_as(DetectorConfig, path, list(overrides), what="detector config")


def local_map(fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
    return [fn(*c) for c in calls]


def build_dataset(cfg: DetectorConfig, map_fn: MapFn = local_map) -> str:
    """Generate the synthetic set (missing chunks only) and return its data.yaml."""
    photos = [p for _, p in list_images(cfg.photos, cfg.limit)]
    data = Path(cfg.output) / "data"
    calls = chunk_calls(photos, str(data), {"train": cfg.synth.train, "val": cfg.synth.val},
                        cfg.synth.seed, cfg.synth.side, cfg.synth.chunk)
    map_fn(generate_chunk, calls)
    return write_data_yaml(str(data))


def _epochs_done(run: Path) -> int:
    csv = run / "results.csv"
    return max(0, len(csv.read_text().strip().splitlines()) - 1) if csv.is_file() else 0


def fit(cfg: DetectorConfig, data_yaml: str) -> Path:
    """Train (or resume, or skip a finished run); returns the run folder."""
    yolo = offline_ultralytics().YOLO
    run = (Path(cfg.output) / "yolo").resolve()
    last = run / "weights" / "last.pt"
    if last.is_file() and _epochs_done(run) >= cfg.epochs:
        return run
    common = dict(workers=0, plots=False, device=cfg.device, verbose=False)
    if last.is_file():
        yolo(str(last)).train(resume=True, data=data_yaml, **common)
    else:
        yolo(cfg.model, task="detect").train(
            data=data_yaml, epochs=cfg.epochs, imgsz=cfg.imgsz, batch=cfg.batch, amp=False, seed=cfg.synth.seed,
            deterministic=True, project=str(run.parent), name=run.name, exist_ok=True, **common)
    return run


def read_yolo_boxes(label: Path) -> np.ndarray:
    """``(n, 4)`` x0, y0, x1, y1 fractions from a YOLO txt label file."""
    rows = np.loadtxt(label, ndmin=2)[:, 1:5] if label.stat().st_size else np.zeros((0, 4))
    return np.concatenate([rows[:, :2] - rows[:, 2:] / 2, rows[:, :2] + rows[:, 2:] / 2], axis=1)


def box_recall(weights: str, data_dir: str, split: str = "val", conf: float = 0.25, imgsz: int = 320,
               iou: float = 0.5, device: str = "cpu") -> float:
    """Fraction of labelled boxes of ``split`` matched by a detection with IoU >= ``iou``."""
    images = sorted((Path(data_dir) / "images" / split).glob("*.jpg"))
    hits = total = 0
    for start in range(0, len(images), 16):
        batch = images[start:start + 16]
        dets = detect([load_rgb(str(p)) for p in batch], weights, conf=conf, imgsz=imgsz, device=device)
        for p, (boxes, _) in zip(batch, dets):
            gt = read_yolo_boxes(Path(data_dir) / "labels" / split / f"{p.stem}.txt")
            total += len(gt)
            hits += int(matched(gt, boxes, iou).sum())
    return hits / total if total else 0.0


def matched(gt: np.ndarray, boxes: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Per ground-truth box (``(n, 4)`` x0, y0, x1, y1): is some detection at IoU >= ``iou``?"""
    if not len(gt) or not len(boxes):
        return np.zeros(len(gt), dtype=bool)
    overlap = box_iou(torch.from_numpy(np.asarray(gt)).float(), torch.from_numpy(np.asarray(boxes)).float())
    return (overlap.max(dim=1).values >= iou).numpy()


def train_detector(cfg: DetectorConfig, map_fn: MapFn = local_map) -> ModelCard:
    """Dataset -> YOLO training -> validation -> registered ``detector`` card."""
    t0 = time.perf_counter()
    data_yaml = build_dataset(cfg, map_fn)
    run = fit(cfg, data_yaml)
    best = run / "weights" / ("best.pt" if (run / "weights" / "best.pt").is_file() else "last.pt")
    yolo = offline_ultralytics().YOLO(str(best), task="detect")
    val = yolo.val(data=data_yaml, imgsz=cfg.imgsz, batch=cfg.batch, workers=0, plots=False,
                   device=cfg.device, verbose=False, project=str(run), name="val", exist_ok=True)
    onnx = export_onnx(str(best), cfg.imgsz)
    recall = box_recall(onnx, str(Path(data_yaml).parent), conf=cfg.conf, imgsz=cfg.imgsz, device=cfg.device)
    card = ModelCard(
        name=cfg.name, kind="detector", arch=Path(cfg.model).stem, weights=onnx, input_size=cfg.imgsz,
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        trained_on=(f"synthetic composites of {cfg.photos} (seed {cfg.synth.seed}, "
                    f"{cfg.synth.train} train / {cfg.synth.val} val)"),
        loss="yolo", source_checkpoint=cfg.model if cfg.model.endswith(".pt") else None,
        train_time_s=round(time.perf_counter() - t0, 1),
        metrics={"box_recall50": round(recall, 4), "map50": round(float(val.box.map50), 4),
                 "epochs": float(_epochs_done(run))},
    )
    register(card, cfg.registry)
    return card
