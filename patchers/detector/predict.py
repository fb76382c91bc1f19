"""Run a trained copy-region detector: images in, boxes (fractions of the image) out."""
from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

Detections = tuple[np.ndarray, np.ndarray]  # boxes (n, 4) x0, y0, x1, y1 in [0, 1]; scores (n,)


def offline_ultralytics() -> Any:
    """Import ultralytics with every network path off (devices are offline): no hub
    look-ups, no telemetry, no Ray Tune callback; settings live in ``$YOLO_CONFIG_DIR``."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "copydet-ultralytics"))
    import ultralytics
    from ultralytics import settings
    if settings.get("sync") or settings.get("raytune"):
        settings.update({"sync": False, "raytune": False})
    return ultralytics


@lru_cache(maxsize=2)
def load_detector(weights: str) -> Any:
    """The YOLO model at a local ``weights`` path, loaded once per process."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights}: detector weights not found")
    return offline_ultralytics().YOLO(weights, task="detect")


def detect(images: list[Image.Image], weights: str, conf: float = 0.25, imgsz: int = 320,
           device: str = "cpu", max_det: int = 20) -> list[Detections]:
    """Boxes of the copied regions in each image, as fractions of its width/height, best first."""
    if not images:
        return []
    model = load_detector(weights)
    results = model.predict([im.convert("RGB") for im in images], conf=conf, imgsz=imgsz, device=device,
                            max_det=max_det, verbose=False)
    out = []
    for r in results:
        boxes = r.boxes.xyxyn.cpu().numpy().astype(np.float32).reshape(-1, 4)
        scores = r.boxes.conf.cpu().numpy().astype(np.float32).reshape(-1)
        out.append((np.clip(boxes, 0.0, 1.0), scores))
    return out
