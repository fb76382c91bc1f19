"""The patch stage: every preset's plan on real pixels, detector/proposal rows, and the
`copydet patch` command on folders with a bad image (errors recorded, shards resumable)."""
import numpy as np
import pyarrow as pa
import pytest

from core.store import join, read_table, write_table
from jobs.cli import main
from jobs.commands.patch import preset_overrides
from jobs.layout import RunDir
from jobs.stages.patch import patch_shard
from patchers.plan import DetectorSpec, plan_images
from patchers.proposals import ProposalParams
from patchers.views import FULL, PRESETS, ViewConfig
from tests.conftest import synthetic_photo

EXPECTED = {"global": 1, "crops": 7, "fast": 10, "ref_fast": 5, "ref_d2lv": 19}


@pytest.fixture
def image_paths(tmp_path):
    out = []
    for i in range(2):
        p = tmp_path / f"I{i}.jpg"
        synthetic_photo(40 + i, size=(128, 96)).save(p)
        out.append((f"I{i}", str(p)))
    return out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_on_pixels(preset, image_paths):
    cfg = ViewConfig(preset=preset)
    table, failed = plan_images(image_paths, cfg)
    assert failed == []
    for image_id, _ in image_paths:
        rows = [r for r in table.to_pylist() if r["image_id"] == image_id]
        assert [r["patch_id"] for r in rows] == list(range(len(rows)))
        assert (rows[0]["kind"], rows[0]["rotation"], rows[0]["flip"]) == ("full", 0, False)
        assert (rows[0]["x0"], rows[0]["y0"], rows[0]["x1"], rows[0]["y1"]) == FULL
        for r in rows:
            assert 0 <= r["x0"] < r["x1"] <= 1 and 0 <= r["y0"] < r["y1"] <= 1
        assert len(rows) <= cfg.max_patches
        if preset in EXPECTED:
            assert len(rows) == EXPECTED[preset]
        assert sorted(r["rotation"] for r in rows if r["kind"] == "rotation") == sorted(cfg.rotations)
        assert sum(r["flip"] for r in rows) == int(cfg.flip)
        n_prop = sum(r["kind"] == "proposal" for r in rows)
        assert n_prop <= cfg.proposals and (cfg.proposals == 0) == (n_prop == 0)


def test_proposal_budget_and_max_patches_bound_each_image(image_paths):
    cfg = ViewConfig(preset="d2lv", proposals=50, max_patches=12)
    table, _ = plan_images(image_paths, cfg)
    counts = {i: table.column("image_id").to_pylist().count(i) for i, _ in image_paths}
    assert set(counts.values()) == {12}  # 9 geometric + proposals, trimmed to max_patches


def test_detections_become_rows_before_proposals(image_paths, monkeypatch):
    calls = []

    def fake_detect(images, weights, conf, imgsz):
        calls.append((len(images), weights, conf, imgsz))
        return [(np.array([[0.1, 0.2, 0.6, 0.7]], np.float32), np.array([0.8], np.float32)) for _ in images]

    import patchers.detector.predict as predict
    monkeypatch.setattr(predict, "detect", fake_detect)
    cfg = ViewConfig(center_crops=[0.5], proposals=3, detector="det")
    table, _ = plan_images(image_paths, cfg, DetectorSpec("w.pt", 160), ProposalParams(conf=0.3), batch=8)
    assert calls == [(2, "w.pt", 0.3, 160)]  # one batched call per chunk of images
    rows = [r for r in table.to_pylist() if r["image_id"] == "I0"]
    assert [r["kind"] for r in rows[:3]] == ["full", "crop", "detection"]
    assert rows[2]["source_score"] == pytest.approx(0.8)
    assert np.allclose([rows[2][k] for k in ("x0", "y0", "x1", "y1")], [0.1, 0.2, 0.6, 0.7])
    assert {r["kind"] for r in rows[3:]} <= {"proposal"} and len(rows) <= 1 + 1 + 1 + 3


def test_patch_stage_uses_the_configured_detector_conf(image_paths, tmp_path, monkeypatch):
    seen = []

    def fake_detect(images, weights, conf, imgsz):
        seen.append(conf)
        boxes = np.array([[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]], np.float32)
        return [(boxes, np.array([0.5, 0.08], np.float32)) for _ in images]

    import patchers.detector.predict as predict
    monkeypatch.setattr(predict, "detect", fake_detect)
    run = RunDir(str(tmp_path / "run"))
    manifest = pa.table({"image_id": [i for i, _ in image_paths], "path": [p for _, p in image_paths]})
    write_table(manifest, join(run.manifest, "query-00000.parquet"))
    for conf, kept in [(0.25, 1), (0.05, 2)]:
        patch_shard(run, "query-00000.parquet", ViewConfig(detector="det", detector_conf=conf), DetectorSpec("w.pt", 160))
        rows = read_table(join(run.patches, "query-00000.parquet")).to_pylist()
        assert seen[-1] == pytest.approx(conf)
        assert sum(r["kind"] == "detection" for r in rows) == kept * len(image_paths)


def test_bad_image_keeps_geometric_views(image_paths, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    table, failed = plan_images([*image_paths, ("bad", str(bad))], ViewConfig(preset="d2lv", proposals=2))
    assert failed == [str(bad)]
    assert table.column("image_id").to_pylist().count("bad") == 9  # full + 3 rotations + 5 crops


def test_preset_option_sets_both_sides():
    assert preset_overrides("fast") == ["patches.query={preset: fast}", "patches.reference={preset: ref_fast}"]
    assert preset_overrides("crops")[1] == "patches.reference={preset: crops}"
    with pytest.raises(ValueError, match="unknown preset"):
        preset_overrides("ref_fast")


def test_patch_command_on_folders_with_a_bad_image(tiny_dataset, tmp_path, ray_local, capsys):
    """Manifest + patch from folders: the bad file is in errors.parquet, the rest is planned."""
    (tiny_dataset / "queries" / "Q999.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    out = tmp_path / "run"
    args = ["patch", "--out", str(out), "--queries", str(tiny_dataset / "queries"),
            "--references", str(tiny_dataset / "references"), "--preset", "d2lv",
            "--set", "patches.query.proposals=4", "--preview", "5"]
    assert main(args) == 0
    errors = read_table(out / "errors.parquet")
    assert [p.rsplit("/", 1)[-1] for p in errors.column("path").to_pylist()] == ["Q999.jpg"]
    patches = read_table(out / "patches.parquet").to_pylist()
    per_image = {}
    for r in patches:
        per_image.setdefault(r["image_id"], []).append(r)
    assert "Q999" not in per_image and len(per_image) == 6 + 8
    for image_id, rows in per_image.items():
        if image_id.startswith("R"):
            assert len(rows) == 19
        else:
            assert 9 <= len(rows) <= 9 + 4 and rows[0]["kind"] == "full"
    assert any(r["kind"] == "proposal" for r in patches)
    printed = capsys.readouterr()
    assert "patch: reference: 8 images, 19.0 patches/image (max 19)" in printed.out + printed.err
    assert (out / "preview.png").stat().st_size > 0 and "<table>" in (out / "preview.html").read_text()

    # resumable: a second run (manifest exists, no folders) rewrites no shard
    shards = sorted((out / "patches.parquet").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in shards]
    same = ["patch", "--out", str(out), "--preset", "d2lv", "--set", "patches.query.proposals=4"]
    assert main(same) == 0
    assert [p.stat().st_mtime_ns for p in sorted((out / "patches.parquet").iterdir())] == mtimes
    # other views on the same folder (the run's own config.yaml, one key changed) are refused, naming
    # the change, and nothing is rewritten
    capsys.readouterr()
    assert main(["patch", "--out", str(out), "--set", "patches.query.proposals=8"]) == 2
    err = capsys.readouterr().err
    assert "patch shards were made with other settings" in err
    assert "query.proposals: 4 -> 8" in err and "'rotations'" not in err  # the key, not its whole section
    assert [p.stat().st_mtime_ns for p in sorted((out / "patches.parquet").iterdir())] == mtimes
