"""Run a trained copy-region detector: images in, boxes (fractions of the image) out."""
from __future__ import annotations

import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.models.cards import RegistryError

Detections = tuple[np.ndarray, np.ndarray]  # boxes (n, 4) x0, y0, x1, y1 in [0, 1]; scores (n,)


# Set before ultralytics is imported (it reads them once): no hub look-ups or telemetry, never
# pip-install a package (a checkpoint can name one), and only weights_only unpickling of a .pt
# (training's own checkpoints: a detector is served from ONNX, see load_detector).
ULTRALYTICS_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "ULTRALYTICS_SAFE_LOAD": "1"}


def offline_ultralytics() -> Any:
    """Import ultralytics with every network and install path off and safe loading on (devices
    are offline; settings live in ``$YOLO_CONFIG_DIR``)."""
    os.environ.update(ULTRALYTICS_ENV)
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "copydet-ultralytics"))
    import ultralytics
    import ultralytics.nn.tasks
    import ultralytics.utils.checks
    from ultralytics import settings
    # The flags are read at import: hold them for an ultralytics imported before this call too.
    ultralytics.utils.checks.AUTOINSTALL = False
    ultralytics.nn.tasks.SAFE_LOAD = True
    if settings.get("sync") or settings.get("raytune"):
        settings.update({"sync": False, "raytune": False})
    return ultralytics


def check_detector(weights: str, name: str = "detector") -> None:
    """Refuse anything but a loadable ONNX detector (one image input), without running it."""
    import onnxruntime as ort

    if not weights.lower().endswith(".onnx"):
        raise RegistryError(f"{name}: {weights} is not an ONNX file; detectors are served from ONNX only")
    try:
        inputs = ort.InferenceSession(weights, providers=["CPUExecutionProvider"]).get_inputs()
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise RegistryError(f"{name}: {weights} is not a loadable ONNX model: {e}") from e
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise RegistryError(f"{name}: {weights} takes {[(i.name, i.shape) for i in inputs]}, not one image batch")


@lru_cache(maxsize=2)
def load_detector(weights: str) -> Any:
    """The YOLO detector exported to ONNX at a local ``weights`` path (run by onnxruntime),
    loaded once per process; no pickle is ever opened here."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights}: detector weights not found")
    check_detector(weights)
    return offline_ultralytics().YOLO(weights, task="detect")


def export_onnx(checkpoint: str, imgsz: int) -> str:
    """Export a trained YOLO checkpoint (copydet's own training output) to ONNX next to it,
    atomically: exported from a copy in a hidden temp folder, then renamed into place."""
    final = Path(checkpoint).with_suffix(".onnx")
    with tempfile.TemporaryDirectory(prefix=".export-", dir=final.parent) as tmp:
        staged = shutil.copy(checkpoint, tmp)  # ultralytics writes the ONNX beside the file it loads
        yolo = offline_ultralytics().YOLO(staged, task="detect")
        os.replace(yolo.export(format="onnx", imgsz=imgsz, dynamic=False, simplify=False, device="cpu"), final)
    return str(final)


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
