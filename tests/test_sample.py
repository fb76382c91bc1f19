"""The bundled sample a fresh clone runs on: complete, decodable, credited, small."""
import csv
from pathlib import Path

from core.imageio import load_rgb

SAMPLE = Path(__file__).parent.parent / "bench" / "sample"


def _ids(sub):
    return {p.stem for p in (SAMPLE / sub).glob("*.jpg")}


def test_sample_layout_and_ground_truth():
    train, refs, queries = _ids("train"), _ids("references"), _ids("queries")
    assert (len(train), len(refs), len(queries)) == (16, 24, 24)
    with open(SAMPLE / "ground_truth.csv") as f:
        gt = list(csv.DictReader(f))
    assert len(gt) == 12
    assert {r["query_id"] for r in gt} <= queries and {r["reference_id"] for r in gt} <= refs


def test_every_sample_image_decodes_and_is_credited():
    readme = (SAMPLE / "README.md").read_text()
    assert "CC-BY-2.0" in readme
    for p in sorted(SAMPLE.glob("*/*.jpg")):
        img = load_rgb(p)
        assert max(img.size) <= 256
        if not p.stem.startswith("Q"):
            assert p.stem in readme, f"{p.name} has no credit line"


def test_sample_stays_small():
    assert sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file()) < 2 * 1024 * 1024
