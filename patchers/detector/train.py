"""Train the copy-region detector (ultralytics YOLO) on synthetic composites and register it.

Steps, each resumable: pin the settings that make the data and the weights in the output
folder (``_settings.json``, as the pipeline stages do: a changed config is refused), generate the
synthetic set (chunks already written are skipped), train (resumed from ``last.pt`` when a run
was interrupted, skipped when all epochs are in ``results.csv``), export the best checkpoint to
ONNX (kept once exported: ONNX export is not byte-reproducible and cards pin the file's hash),
measure box recall at IoU >= 0.5 (of the ONNX model, which is what the pipeline runs) and mAP50
on the validation split, and write a ``detector`` model card pointing at the ONNX file. A
finished run whose card still holds its ONNX is left as it is. Training is offline: a ``.yaml``
model definition (random init) or a local ``.pt``, opened with ultralytics' weights-only
loading; never a hub name.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator
from torchvision.ops import box_iou

from core.imageio import ImageDecodeError, list_images, load_rgb, sha256_file
from core.models.cards import ModelCard, RegistryError
from core.models.registry import file_hash, load_card, register
from core.settings import SETTINGS_FILE, pin_settings
from core.store import absolute
from core.yamlconf import ConfigModel, load_as
from patchers.detector.predict import check_detector, detect, export_onnx, offline_ultralytics
from patchers.detector.synth import chunk_calls, generate_chunk, write_data_yaml

MapFn = Callable[[Callable[..., Any], Sequence[tuple]], list[Any]]
SPLITS = ("train", "val")
log = logging.getLogger(__name__)


class SynthConfig(ConfigModel):
    train: int = Field(2000, ge=1, description="synthetic training images")
    val: int = Field(200, ge=1, description="synthetic validation images (from held-aside photos)")
    side: int = Field(320, ge=32, description="long side of the written images")
    seed: int = 0
    chunk: int = Field(64, ge=1, description="images per generation task")


class DetectorConfig(ConfigModel):
    """``configs/detector/*.yaml``: what to train, on what, and where to put it."""

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
        if not v.endswith(".pt"):  # found now, not after the synthetic set is built
            from ultralytics.nn.tasks import yaml_model_load
            try:
                yaml_model_load(v)
            except FileNotFoundError:
                raise ValueError(f"{v}: no such model definition (a local .yaml, or one of ultralytics' own, "
                                 "e.g. yolov8n.yaml)") from None
        return v

    def anchored(self) -> DetectorConfig:
        """This config with its folders as absolute paths, read where the command runs: the synthetic
        set is written by Ray tasks, which on a cluster run in other folders."""
        return self.model_copy(update={"photos": absolute(self.photos), "output": absolute(self.output),
                                       "registry": self.registry and absolute(self.registry)})


def load_detector_config(path: str, overrides: list[str] = ()) -> DetectorConfig:
    """Read and validate a detector YAML; errors name the file and the key."""
    return load_as(DetectorConfig, path, list(overrides), what="detector config")


def local_map(fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
    return [fn(*c) for c in calls]


def list_photos(cfg: DetectorConfig) -> list[tuple[str, str]]:
    """``(id, path)`` of the training photos; an empty folder is refused before anything is pinned."""
    photos = list_images(cfg.photos, cfg.limit)
    if not photos:
        raise ValueError(f"{cfg.photos}: no photos to make synthetic detector data from")
    return photos


def run_settings(cfg: DetectorConfig, photos: list[tuple[str, str]]) -> dict[str, Any]:
    """What determines the synthetic set and the weights (not chunking, device, conf, name or registry)."""
    ids = "\n".join(i for i, _ in photos).encode()
    return {"photos": str(Path(cfg.photos).resolve()), "photo_count": len(photos),
            "photo_ids_sha256": hashlib.sha256(ids).hexdigest(),
            **{f"synth.{k}": v for k, v in cfg.synth.model_dump(exclude={"chunk"}).items()},
            "model": cfg.model, "model_sha256": sha256_file(cfg.model) if cfg.model.endswith(".pt") else None,
            "epochs": cfg.epochs, "imgsz": cfg.imgsz, "batch": cfg.batch}


def written(data: Path) -> dict[str, int]:
    """Synthetic images on disk per split."""
    return {s: len(list((data / "images" / s).glob("*.jpg"))) for s in SPLITS}


def refuse_empty(cfg: DetectorConfig, photos: list[str], counts: dict[str, int]) -> None:
    """Refuse a split with no image before training (ultralytics' own error names no photo); with
    nothing made, the settings record goes too, so a corrected config is not refused."""
    empty = [s for s in SPLITS if not counts[s]]
    if not empty:
        return
    bad = []
    for p in photos:
        try:
            load_rgb(p)
        except ImageDecodeError as e:
            bad.append(e)
    first = f" (first: {bad[0]})" if bad else ""
    if not any(counts.values()):
        (Path(cfg.output) / SETTINGS_FILE).unlink(missing_ok=True)
    if len(bad) == len(photos):
        raise ValueError(f"none of the {len(photos)} photos in {cfg.photos} decode{first}; fix or replace them")
    if not bad:  # every photo decodes: the images were made, but not where the driver counts them
        raise ValueError(f"no synthetic {' or '.join(empty)} image found in {Path(cfg.output) / 'data'} although "
                         "every photo decodes; is that folder the same one on every Ray node?")
    why = " (validation draws on every 10th photo only)" if "val" in empty else ""
    raise ValueError(f"no synthetic {' or '.join(empty)} image could be made: {len(bad)} of {len(photos)} photos "
                     f"in {cfg.photos} do not decode{first}{why}")


def build_dataset(cfg: DetectorConfig, photos: list[str], map_fn: MapFn = local_map) -> tuple[str, dict[str, int]]:
    """Generate the synthetic set (missing chunks only); returns its data.yaml and images per split."""
    data = Path(cfg.output) / "data"
    calls = chunk_calls(photos, str(data), {"train": cfg.synth.train, "val": cfg.synth.val},
                        cfg.synth.seed, cfg.synth.side, cfg.synth.chunk)
    map_fn(generate_chunk, calls)
    counts = written(data)
    refuse_empty(cfg, photos, counts)
    return write_data_yaml(str(data)), counts


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


def best_checkpoint(run: Path) -> Path:
    """``best.pt`` of the run, else ``last.pt``."""
    weights = run / "weights"
    return weights / ("best.pt" if (weights / "best.pt").is_file() else "last.pt")


def onnx_of(checkpoint: Path, imgsz: int) -> str:
    """The checkpoint's ONNX export, made once: a loadable export newer than the checkpoint is kept,
    since a new one has other bytes and cards (and patch folders) pin the file's hash."""
    onnx = checkpoint.with_suffix(".onnx")
    if onnx.is_file() and onnx.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns:
        try:
            check_detector(str(onnx))
            return str(onnx)
        except RegistryError as e:
            log.warning(f"exporting again: {e}")
    return export_onnx(str(checkpoint), imgsz)


def registered_card(cfg: DetectorConfig, run: Path) -> ModelCard | None:
    """The registered card of this finished run if it still describes it and its ONNX file."""
    if not (run / "weights" / "last.pt").is_file() or _epochs_done(run) < cfg.epochs:
        return None
    try:
        card = load_card(cfg.name, cfg.registry)
    except RegistryError:
        return None
    onnx = best_checkpoint(run).with_suffix(".onnx")
    current = (card.kind == "detector" and card.arch == Path(cfg.model).stem and card.input_size == cfg.imgsz
               and card.weights is not None and Path(card.weights).resolve() == onnx.resolve() and onnx.is_file()
               and card.weights_sha256 == file_hash(onnx))
    return card if current else None


def trained_on(cfg: DetectorConfig, counts: dict[str, int]) -> str:
    """The card's data description, with the images actually written (undecodable photos skip some)."""
    skipped = cfg.synth.train + cfg.synth.val - sum(counts.values())
    note = f"; {skipped} samples skipped: undecodable photos" if skipped else ""
    return (f"synthetic composites of {cfg.photos} (seed {cfg.synth.seed}, "
            f"{counts['train']} train / {counts['val']} val{note})")


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
    """Dataset -> YOLO training -> validation -> registered ``detector`` card; a finished run
    whose card is current returns that card untouched."""
    t0 = time.perf_counter()
    photos = list_photos(cfg)
    pin_settings(cfg.output, run_settings(cfg, photos), "detector", "set another output folder in the config",
                 made="training set and weights")
    if card := registered_card(cfg, (Path(cfg.output) / "yolo").resolve()):
        log.info(f"detector {cfg.name}: {cfg.output} is trained and registered; kept as it is")
        return card
    data_yaml, counts = build_dataset(cfg, [p for _, p in photos], map_fn)
    run = fit(cfg, data_yaml)
    best = best_checkpoint(run)
    yolo = offline_ultralytics().YOLO(str(best), task="detect")
    val = yolo.val(data=data_yaml, imgsz=cfg.imgsz, batch=cfg.batch, workers=0, plots=False,
                   device=cfg.device, verbose=False, project=str(run), name="val", exist_ok=True)
    onnx = onnx_of(best, cfg.imgsz)
    recall = box_recall(onnx, str(Path(data_yaml).parent), conf=cfg.conf, imgsz=cfg.imgsz, device=cfg.device)
    card = ModelCard(
        name=cfg.name, kind="detector", arch=Path(cfg.model).stem, weights=onnx, input_size=cfg.imgsz,
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), trained_on=trained_on(cfg, counts),
        loss="yolo", source_checkpoint=cfg.model if cfg.model.endswith(".pt") else None,
        train_time_s=round(time.perf_counter() - t0, 1),
        metrics={"box_recall50": round(recall, 4), "map50": round(float(val.box.map50), 4),
                 "epochs": float(_epochs_done(run))},
    )
    register(card, cfg.registry)
    return card
