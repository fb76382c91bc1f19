"""Copy-region detector: deterministic synthetic labels, a tiny YOLO that trains, exports to ONNX,
registers, loads back and predicts; and a malicious checkpoint that never gets to run."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from patchers.detector.synth import (
    chunk_calls,
    generate_chunk,
    split_photos,
    write_data_yaml,
)
from tests.conftest import synthetic_photo


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        synthetic_photo(200 + i, size=(120, 90)).save(folder / f"P{i:03d}.jpg")
    return folder


def _labels(root: Path, split: str) -> dict[str, np.ndarray]:
    return {p.stem: np.loadtxt(p, ndmin=2) for p in sorted((root / "labels" / split).glob("*.txt"))}


def test_synthetic_set_is_deterministic_with_labels_inside(photos, tmp_path):
    paths = sorted(str(p) for p in photos.glob("*.jpg"))
    by_split = split_photos(paths)
    assert set(by_split["val"]).isdisjoint(by_split["train"]) and len(by_split["val"]) == 2
    a, b, c = (str(tmp_path / n) for n in "abc")
    for out, seed, chunk in ((a, 0, 3), (b, 0, 5), (c, 1, 5)):  # chunking must not change the samples
        for call in chunk_calls(paths, out, {"train": 6, "val": 2}, seed, 96, chunk):
            generate_chunk(*call)
    assert chunk_calls(paths, a, {"train": 6, "val": 2}, 0, 96, 3) == []  # all chunks done
    for split, n in (("train", 6), ("val", 2)):
        imgs_a = sorted((Path(a) / "images" / split).glob("*.jpg"))
        assert len(imgs_a) == n
        for p in imgs_a:
            assert p.read_bytes() == (Path(b) / "images" / split / p.name).read_bytes()
        la = _labels(Path(a), split)
        assert all(np.array_equal(la[k], v) for k, v in _labels(Path(b), split).items())
        for lab in la.values():
            cls, cx, cy, w, h = lab[0]
            assert cls == 0 and 0 < w <= 1 and 0 < h <= 1
            assert 0 <= cx - w / 2 and cx + w / 2 <= 1 + 1e-6 and 0 <= cy - h / 2 and cy + h / 2 <= 1 + 1e-6
    differs = [p.read_bytes() != (Path(c) / "images" / "train" / p.name).read_bytes()
               for p in sorted((Path(a) / "images" / "train").glob("*.jpg"))]
    assert any(differs)
    assert "path: " + str(Path(a).resolve()) in Path(write_data_yaml(a)).read_text()


def test_box_recall_counts_matches_at_iou_half(tmp_path, monkeypatch):
    from PIL import Image

    import patchers.detector.train as train
    for split_dir in ("images/val", "labels/val"):
        (tmp_path / split_dir).mkdir(parents=True)
    for k, label in enumerate(["0 0.5 0.5 0.4 0.4\n", "0 0.25 0.25 0.5 0.5\n"]):
        Image.new("RGB", (32, 32)).save(tmp_path / "images" / "val" / f"v{k}.jpg")
        (tmp_path / "labels" / "val" / f"v{k}.txt").write_text(label)
    assert np.allclose(train.read_yolo_boxes(tmp_path / "labels" / "val" / "v1.txt"), [[0, 0, 0.5, 0.5]])
    # one detection: IoU with v0's box 0.14 / 0.18 = 0.78 (hit), with v1's 0.03 / 0.38 = 0.08 (miss)
    dets = np.array([[0.3, 0.35, 0.7, 0.75]], np.float32)
    monkeypatch.setattr(train, "detect", lambda images, *a, **k: [(dets, np.ones(1, np.float32))] * len(images))
    assert train.box_recall("w.pt", str(tmp_path)) == 0.5


def test_pasted_box_is_where_the_photo_is(tmp_path):
    """The label of a plain paste is the region whose pixels come from the photo."""
    from patchers.detector.synth import paste_onto_photo
    photo = synthetic_photo(1, size=(120, 90))
    background = synthetic_photo(2, size=(300, 200))
    canvas, mask = paste_onto_photo(photo, background, np.random.default_rng(5))
    x0, y0, x1, y1 = mask.getbbox()
    assert canvas.size == mask.size and (x1 - x0) * (y1 - y0) >= 0.09 * canvas.width * canvas.height
    inside = np.asarray(canvas.crop((x0, y0, x1, y1)).resize(photo.size), dtype=float)
    outside = np.asarray(canvas.crop((0, 0, x0 or canvas.width // 4, canvas.height)).resize(photo.size), dtype=float)
    target = np.asarray(photo, dtype=float)
    assert mask.crop((x0, y0, x1, y1)).getextrema() == (255, 255)  # this seed pastes upright
    assert np.abs(inside - target).mean() < np.abs(outside - target).mean()


def test_tiny_detector_trains_registers_and_predicts(photos, tmp_path, ray_local):
    from core.models.registry import load_card
    from jobs.runtime import run_tasks
    from jobs.stages.patch import resolve_detector
    from patchers.detector.predict import detect
    from patchers.detector.train import DetectorConfig, train_detector
    from patchers.plan import plan_images
    from patchers.proposals import ProposalParams
    from patchers.views import ViewConfig

    cfg = DetectorConfig(name="det-test", photos=str(photos), output=str(tmp_path / "det"),
                         registry=str(tmp_path / "models"), synth={"train": 8, "val": 4, "side": 128, "chunk": 4},
                         model="yolov8n.yaml", epochs=1, imgsz=128, batch=4, conf=0.01)
    card = train_detector(cfg, lambda fn, calls: run_tasks(fn, calls, "synth"))
    assert len(list((tmp_path / "det" / "data" / "images" / "train").glob("*.jpg"))) == 8
    loaded = load_card("det-test", tmp_path / "models")
    assert loaded == card and card.kind == "detector" and Path(card.weights).is_file()
    assert card.weights.endswith("best.onnx") and len(card.weights_sha256) == 64  # served from ONNX, pinned
    assert 0 <= card.metrics["box_recall50"] <= 1 and 0 <= card.metrics["map50"] <= 1
    assert card.metrics["epochs"] == 1

    val = sorted((tmp_path / "det" / "data" / "images" / "val").glob("*.jpg"))
    from PIL import Image
    (boxes, scores), = detect([Image.open(val[0])], card.weights, conf=0.001, imgsz=128)
    assert len(boxes) > 0 and boxes.shape[1] == 4 and len(scores) == len(boxes)
    assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, 2:] >= boxes[:, :2])

    # the patch stage resolves it by name and plans with it (a 1-epoch model's boxes are near-full
    # and get deduplicated against the full view; test_patch_stage checks detection rows)
    spec = resolve_detector("det-test", str(tmp_path / "models"))
    assert spec.weights == str(Path(card.weights).resolve()) and spec.imgsz == 128
    assert spec.sha256 == card.weights_sha256
    table, failed = plan_images([("v0", str(val[0]))], ViewConfig(detector="det-test", max_patches=6), spec,
                                ProposalParams(conf=0.001))
    kinds = table.column("kind").to_pylist()
    assert failed == [] and kinds[0] == "full" and set(kinds) <= {"full", "detection"} and len(kinds) <= 6

    # a second call resumes: training is skipped (last.pt untouched)
    last = tmp_path / "det" / "yolo" / "weights" / "last.pt"
    mtime = last.stat().st_mtime_ns
    train_detector(cfg)
    assert last.stat().st_mtime_ns == mtime


class Payload:
    """Unpickling this runs a shell command (what a crafted checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def malicious(tmp_path) -> tuple[Path, Path]:
    """An ultralytics-style ``.pt`` whose unpickling touches ``marker``; the payload is real
    (a plain ``torch.load`` in another process runs it)."""
    import torch
    marker, pt = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": Payload(marker), "train_args": {}}, pt)
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(pt)!r}, weights_only=False)"],
                   check=True, capture_output=True, timeout=120)
    assert marker.exists()
    marker.unlink()
    return pt, marker


def test_a_malicious_checkpoint_never_runs(malicious, tmp_path, capsys):
    from core.models.cards import ModelCard, RegistryError
    from core.models.registry import register
    from jobs.cli import main
    from jobs.stages.patch import resolve_detector
    from patchers.detector.predict import load_detector, offline_ultralytics

    pt, marker = malicious
    registry = tmp_path / "models"
    onnx_named = tmp_path / "evil.onnx"
    onnx_named.write_bytes(pt.read_bytes())  # the same pickle under an ONNX name
    for name, weights, refusal in [("evil-pt", pt, "copydet never loads a pickled checkpoint"),
                                   ("evil-onnx", onnx_named, "is not a loadable ONNX model")]:
        register(ModelCard(name=name, kind="detector", arch="yolov8n", weights=str(weights), input_size=128,
                           mean=(0, 0, 0), std=(1, 1, 1)), registry)
        with pytest.raises(RegistryError, match=refusal):
            resolve_detector(name, str(registry))
    with pytest.raises(RegistryError, match="not an ONNX file"):
        load_detector(str(pt))
    # a run that names it stops at start, on one line, before any stage or config.yaml
    out = tmp_path / "run"
    assert main(["patch", "--out", str(out), "--set", f"registry={registry}",
                 "--set", "patches.query.detector=evil-pt"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and f"patches.query.detector: detector 'evil-pt': {pt} is not an ONNX file" in err[0]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    # training from a named .pt goes through ultralytics' weights-only loading: refused, nothing runs
    ultralytics = offline_ultralytics()
    assert ultralytics.utils.checks.AUTOINSTALL is False and ultralytics.nn.tasks.SAFE_LOAD is True
    with pytest.raises(TypeError, match="outside the supported Ultralytics checkpoint format"):
        ultralytics.YOLO(str(pt), task="detect")
    assert not marker.exists()
