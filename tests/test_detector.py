"""Copy-region detector: deterministic synthetic labels, a tiny YOLO that trains, exports to ONNX,
registers, loads back and predicts; re-runs that keep a finished run, refuse a changed config and
name undecodable photos; and a malicious checkpoint that never gets to run."""
import os
import re
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


def _photo_folder(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    for i in range(12):
        synthetic_photo(200 + i, size=(120, 90)).save(folder / f"P{i:03d}.jpg")
    return folder


@pytest.fixture
def photos(tmp_path) -> Path:
    return _photo_folder(tmp_path / "photos")


def _tiny_config(photos: Path, root: Path, **changes):
    from patchers.detector.train import DetectorConfig
    cfg = dict(name="det-test", photos=str(photos), output=str(root / "det"), registry=str(root / "models"),
               synth={"train": 8, "val": 4, "side": 128, "chunk": 4}, model="yolov8n.yaml", epochs=1,
               imgsz=128, batch=4, conf=0.01)
    return DetectorConfig.model_validate({**cfg, **changes})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ray_local):
    """A tiny detector trained once (chunks as Ray tasks) on 12 photos and P012.jpg, which does not
    decode: train samples 4, 5 and 7 draw it and are skipped."""
    from jobs.runtime import run_tasks
    from patchers.detector.train import train_detector
    root = tmp_path_factory.mktemp("tiny")
    photos = _photo_folder(root / "photos")
    (photos / "P012.jpg").write_bytes(b"not a jpeg")
    cfg = _tiny_config(photos, root)
    return cfg, train_detector(cfg, lambda fn, calls: run_tasks(fn, calls, "synth")), root


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


def test_a_chunk_marked_with_no_image_is_made_again(photos, tmp_path):
    """Older versions marked a chunk whose photos did not decode as done, holding 0."""
    paths = sorted(str(p) for p in photos.glob("*.jpg"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".done-train-000000").write_text("0")
    (tmp_path / "data" / ".done-train-000004").write_text("4")
    calls = chunk_calls(paths, str(tmp_path / "data"), {"train": 8}, 0, 96, 4)
    assert [c[2:5] for c in calls] == [("train", 0, 4)]


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


def test_tiny_detector_trains_registers_and_predicts(tiny):
    from core.models.registry import load_card
    from jobs.stages.patch import resolve_detector
    from patchers.detector.predict import detect
    from patchers.plan import plan_images
    from patchers.proposals import ProposalParams
    from patchers.views import ViewConfig

    cfg, card, tmp_path = tiny
    assert len(list((tmp_path / "det" / "data" / "images" / "train").glob("*.jpg"))) == 5
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


def test_the_card_counts_the_images_written(tiny):
    """Samples that drew the undecodable photo are not claimed as training data."""
    cfg, card, _ = tiny
    assert "(seed 0, 5 train / 4 val; 3 samples skipped: undecodable photos)" in card.trained_on


def _stamps(root: Path) -> dict[str, tuple[int, bytes]]:
    """mtime and bytes of the files a re-run must not touch: checkpoint, ONNX and card."""
    weights = root / "det" / "yolo" / "weights"
    files = [weights / "last.pt", weights / "best.onnx", root / "models" / "det-test.json"]
    return {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}


def test_a_finished_run_is_kept_as_registered(tiny):
    """ONNX export is not byte-reproducible: exporting again would change the hash that patch
    folders pin. A finished, registered run is returned as it is."""
    from patchers.detector.train import train_detector
    cfg, card, root = tiny
    before = _stamps(root)
    assert train_detector(cfg) == card
    assert _stamps(root) == before


def test_a_lost_card_is_registered_again_with_the_same_onnx(tiny):
    from patchers.detector.train import train_detector
    cfg, card, root = tiny
    onnx = Path(card.weights)
    before = onnx.stat().st_mtime_ns
    (root / "models" / "det-test.json").unlink()
    again = train_detector(cfg)
    assert again.weights == card.weights and again.weights_sha256 == card.weights_sha256
    assert onnx.stat().st_mtime_ns == before


@pytest.mark.parametrize("change, named", [
    ({"model": "yolov8s.yaml"}, "model: 'yolov8n.yaml' -> 'yolov8s.yaml'"),
    ({"synth": {"train": 12, "val": 4, "side": 128, "chunk": 4}}, "synth.train: 8 -> 12"),
    ({"synth": {"train": 8, "val": 4, "side": 128, "chunk": 4, "seed": 1}}, "synth.seed: 0 -> 1"),
    ({"epochs": 2}, "epochs: 1 -> 2"),
    ({"limit": 6}, "photo_count: 13 -> 6"),
])
def test_a_changed_config_is_refused(tiny, change, named):
    """Resuming would keep the old data and weights under a card describing the new config."""
    from patchers.detector.train import train_detector
    cfg, card, root = tiny
    before = _stamps(root)
    changed = _tiny_config(cfg.photos, root, **change)
    with pytest.raises(ValueError, match="detector training set and weights were made with other settings") as e:
        train_detector(changed)
    assert named in str(e.value) and f"set another output folder in the config, or delete {cfg.output}" in str(e.value)
    # settings that change neither data nor weights are no reason to refuse
    kept = train_detector(_tiny_config(cfg.photos, root, conf=0.2, synth={**cfg.synth.model_dump(), "chunk": 3}))
    assert kept.weights_sha256 == card.weights_sha256 and _stamps(root) == before


def test_a_model_definition_that_does_not_exist_is_a_config_error(tmp_path):
    """Found when the config is read, not after the synthetic set is built."""
    with pytest.raises(ValueError, match="nosuch.yaml: no such model definition"):
        _tiny_config(tmp_path, tmp_path, model="nosuch.yaml")
    assert _tiny_config(tmp_path, tmp_path, model="yolov8s.yaml").model == "yolov8s.yaml"  # ultralytics' own


def test_undecodable_photos_are_named_and_leave_nothing_done(tmp_path, monkeypatch, caplog):
    """No photo decodes: a clear error before training, and no done marker or settings record that
    would keep the run broken (or refuse a corrected config) once the photos are fixed."""
    import patchers.detector.train as train
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        (folder / f"P{i:03d}.jpg").write_bytes(b"not a jpeg")
    cfg = _tiny_config(folder, tmp_path)
    monkeypatch.setattr(train, "fit", lambda *a: pytest.fail("trained on no data"))
    first = folder.resolve() / "P000.jpg"
    with pytest.raises(ValueError, match=re.escape(f"none of the 12 photos in {folder} decode (first: {first}: ")):
        train.train_detector(cfg)
    assert "P0" in caplog.text and "skipped" in caplog.text  # each skipped sample names its photo
    data = tmp_path / "det" / "data"
    assert list(data.glob(".done-*")) == [] and not (tmp_path / "det" / "_settings.json").exists()

    _photo_folder(folder)  # fixed in place: the whole set is made now

    class Trained(Exception):
        pass

    def fit(*a):
        raise Trained
    monkeypatch.setattr(train, "fit", fit)
    with pytest.raises(Trained):
        train.train_detector(cfg)
    assert train.written(data) == {"train": 8, "val": 4}


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
    assert not out.exists()  # nothing written: the folder the lock made is gone again
    # training from a named .pt goes through ultralytics' weights-only loading: refused, nothing runs
    ultralytics = offline_ultralytics()
    assert ultralytics.utils.checks.AUTOINSTALL is False and ultralytics.nn.tasks.SAFE_LOAD is True
    with pytest.raises(TypeError, match="outside the supported Ultralytics checkpoint format"):
        ultralytics.YOLO(str(pt), task="detect")
    assert not marker.exists()


def test_a_model_that_is_not_a_detector_is_told_how_a_detector_is_made(tmp_path, capsys):
    from core.models.cards import ModelCard
    from core.models.registry import register
    from jobs.cli import main

    registry = tmp_path / "models"
    weights = tmp_path / "embedder.onnx"
    weights.write_bytes(b"onnx")
    register(ModelCard(name="mydet", kind="external", arch="onnx", weights=str(weights), input_size=64,
                       mean=(0, 0, 0), std=(1, 1, 1)), registry)
    for name in ("mydet", "nodet"):  # an imported embedding model, and no model at all
        assert main(["patch", "--out", str(tmp_path / "run"), "--set", f"registry={registry}",
                     "--set", f"patches.query.detector={name}"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and f"make the detector {name!r} with `copydet detector train CONFIG`" in err[0]
        assert "import-onnx" not in err[0]  # that registers an embedding model, which is refused here


def test_the_command_gives_its_tasks_absolute_folders(photos, tmp_path, monkeypatch):
    """Synthesis runs as Ray tasks, on a cluster in other folders: a relative `output:` was each
    worker's own folder, where the driver never found the set."""
    import yaml

    from jobs.cli import main
    from patchers.detector import train

    seen = []

    def seen_then_stopped(cfg, map_fn):
        seen.append(cfg)
        raise ValueError("stopped before any work")

    monkeypatch.setattr("jobs.commands.detector.init_ray", lambda *a: None)
    monkeypatch.setattr(train, "train_detector", seen_then_stopped)
    monkeypatch.chdir(tmp_path)
    assert photos == tmp_path / "photos"
    (tmp_path / "det.yaml").write_text(yaml.safe_dump({"name": "d", "photos": "photos", "output": "runs/det",
                                                       "registry": "~/models", "model": "yolov8n.yaml"}))
    assert main(["detector", "train", "det.yaml"]) == 2
    cfg, = seen
    assert (cfg.output, cfg.photos) == (str(tmp_path / "runs" / "det"), str(tmp_path / "photos"))
    assert cfg.registry == os.path.expanduser("~/models")


def test_an_empty_set_of_decodable_photos_is_not_blamed_on_them(photos, tmp_path):
    from patchers.detector.train import refuse_empty

    paths = sorted(str(p) for p in photos.glob("*.jpg"))
    with pytest.raises(ValueError, match="no synthetic train or val image found in .* although every photo decodes"):
        refuse_empty(_tiny_config(photos, tmp_path), paths, {"train": 0, "val": 0})
