"""Extraction halves without Ray: chunk plans, one decode per image for every key, the model
actor's files, and shape buckets for aspect-kept members."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import patchers.extract as pe
from core.contracts import chunk_file, plan_chunks
from core.imageio import load_rgb
from core.models.encoders import build_encoder
from core.models.preprocess import Preprocess, resized_size
from core.models.resolve import backbone_card
from core.store import read_table, write_table
from patchers.plan import plan_table
from patchers.views import ViewConfig
from tests.conftest import synthetic_photo


def test_plan_chunks_holds_whole_images():
    ids = ["a"] * 3 + ["b"] * 3 + ["c"] * 5 + ["d"]
    assert plan_chunks(ids, 6) == [(0, 6), (6, 12)]
    assert plan_chunks(ids, 4) == [(0, 3), (3, 6), (6, 11), (11, 12)]  # "c" alone, over the size
    assert plan_chunks([], 4) == []
    assert chunk_file("query-00002.parquet", 3) == "query-00002-0003.parquet"


def test_pack_round_trips_ragged_patches():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, s, dtype=np.uint8) for s in [(4, 6, 3), (5, 5, 3), (1, 9, 3)]]
    flat, shapes = pe.pack(arrays)
    assert flat.dtype == np.uint8 and shapes.tolist() == [[4, 6, 3], [5, 5, 3], [1, 9, 3]]
    for a, b in zip(arrays, pe.unpack(flat, shapes)):
        np.testing.assert_array_equal(a, b)
    assert pe.unpack(*pe.pack([])) == []


@pytest.fixture
def run_folders(tmp_path):
    """A manifest shard of 3 images (one of them unreadable) and its crops-preset patch shard."""
    images = tmp_path / "img"
    images.mkdir()
    paths = {}
    for i in range(3):
        paths[f"I{i}"] = str(images / f"I{i}.jpg")
        synthetic_photo(i, (80, 60)).save(paths[f"I{i}"])
    Path(paths["I2"]).write_bytes(b"not an image")
    write_table(pa.table({"image_id": list(paths), "path": list(paths.values()), "width": [80] * 3,
                          "height": [60] * 3}),
                tmp_path / "manifest" / "query-00000.parquet")
    write_table(plan_table(list(paths), ViewConfig(preset="crops")), tmp_path / "patches" / "query-00000.parquet")
    return tmp_path, paths


def test_each_image_is_decoded_once_for_every_key(run_folders, monkeypatch):
    root, paths = run_folders
    decoded = []
    monkeypatch.setattr(pe, "load_rgb", lambda p, **kw: decoded.append(p) or load_rgb(p, **kw))
    card = backbone_card("tiny_cnn")
    pres = [Preprocess.for_card(card, 32), Preprocess.for_card(card, 48)]
    task = pe.ChunkTask("query-00000.parquet", 0, 0, 21, (0, 1))
    row = pe.decode_chunk(task, str(root / "patches"), str(root / "manifest"), pres)
    assert sorted(decoded) == sorted(paths.values())  # 3 images, 2 keys: 3 decodes
    assert row["image_id"] == ["I0"] * 7 + ["I1"] * 7 and row["patch_id"] == list(range(7)) * 2
    assert len(row["errors"]) == 1 and paths["I2"] in row["errors"][0]
    assert row["shape0"].tolist() == [[32, 32, 3]] * 14 and row["shape1"].tolist() == [[48, 48, 3]] * 14


def test_the_model_actor_writes_what_the_encoder_gives(run_folders):
    root, paths = run_folders
    card = backbone_card("tiny_cnn")
    keys = [pe.KeySpec(card, Preprocess.for_card(card, s), str(root / "features" / f"tiny@{s}"), "tiny_cnn", s,
                       batch_size=5) for s in (32, 48)]
    task = pe.ChunkTask("query-00000.parquet", 0, 0, 21, (0, 1))
    row = pe.decode_chunk(task, str(root / "patches"), str(root / "manifest"), [k.pre for k in keys])
    out = pe.ChunkEmbedder(keys, str(root / "errors"), num_threads=1).embed(row)
    assert out == {"file": "query-00000-0000.parquet", "planned": 21, "patches": 14, "errors": 1}
    patches = read_table(root / "patches" / "query-00000.parquet").slice(0, 7).to_pylist()
    img = load_rgb(paths["I0"])
    crops = [pe.cut_patch(img, (p["x0"], p["y0"], p["x1"], p["y1"])) for p in patches]
    for key in keys:
        feats = read_table(f"{key.folder}/query-00000-0000.parquet")
        want = build_encoder(card, key.scale).embed(crops)
        got = np.stack(feats.column("embedding").to_numpy(zero_copy_only=False)[:7])
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert read_table(root / "errors").num_rows == 1


def test_a_big_jpeg_decodes_at_the_size_its_largest_patch_needs(tmp_path, monkeypatch):
    """4000x3000 JPEG, the whole image and a 0.5 centre crop at 64 px: the crop (2000x1500 -> 64x64)
    needs a 171 px long side, so the decoder draws 1/8 of each side (500x375) instead of 12 MP,
    and the patches match those cut from a full decode."""
    path = tmp_path / "big.jpg"
    synthetic_photo(7, (4000, 3000)).save(path, quality=95)
    write_table(pa.table({"image_id": ["B"], "path": [str(path)], "width": [4000], "height": [3000]}),
                tmp_path / "manifest" / "query-00000.parquet")
    write_table(plan_table(["B"], ViewConfig(center_crops=[0.5])), tmp_path / "patches" / "query-00000.parquet")
    decoded = []
    monkeypatch.setattr(pe, "load_rgb", lambda p, **kw: decoded.append(load_rgb(p, **kw).size) or load_rgb(p, **kw))
    pre = Preprocess.for_card(backbone_card("tiny_cnn"), 64)
    row = pe.decode_chunk(pe.ChunkTask("query-00000.parquet", 0, 0, 2, (0,)), str(tmp_path / "patches"),
                          str(tmp_path / "manifest"), [pre])
    assert decoded == [(500, 375)]
    full = load_rgb(path)
    want = [pre.resize(pe.cut_patch(full, box)) for box in [(0, 0, 1, 1), (0.25, 0.25, 0.75, 0.75)]]
    got = pe.unpack(row["px0"], row["shape0"])
    assert len(got) == 2 and all(np.abs(a.astype(int) - b).mean() < 3 for a, b in zip(got, want))
    crop = {"image_id": ["B"], "x0": [0.25], "y0": [0.25], "x1": [0.75], "y1": [0.75]}
    assert pe.draft_sides({**crop, "rotation": [0]}, {"B": (4000, 3000)}, [pre]) == {"B": 171}
    wide = Preprocess.for_card(backbone_card("tiny_cnn").model_copy(update={"resize": "long_side"}), 1000)
    assert pe.draft_sides({**crop, "rotation": [90]}, {"B": (4000, 3000)}, [wide]) == {"B": 2000}  # no draft



def test_embedding_in_process_decodes_a_big_jpeg_as_extraction_does(tmp_path):
    """The service and `index add` embed decoded images; given the file or its bytes they decode
    a big JPEG again at extraction's draft size, so the patches are extraction's to the pixel."""
    from patchers.embed import ImageEmbedder

    path = tmp_path / "big.jpg"
    synthetic_photo(3, (2400, 1800)).save(path, quality=90)
    views = ViewConfig(center_crops=[0.5])
    write_table(pa.table({"image_id": ["B"], "path": [str(path)], "width": [2400], "height": [1800]}),
                tmp_path / "manifest" / "query-00000.parquet")
    write_table(plan_table(["B"], views), tmp_path / "patches" / "query-00000.parquet")
    card = backbone_card("tiny_cnn")
    key = pe.KeySpec(card, Preprocess.for_card(card, 64), str(tmp_path / "features"), "tiny_cnn", 64)
    row = pe.decode_chunk(pe.ChunkTask("query-00000.parquet", 0, 0, 2, (0,)), str(tmp_path / "patches"),
                          str(tmp_path / "manifest"), [key.pre])
    batch = pe.unpack(row["px0"], row["shape0"])
    emb = ImageEmbedder([key], views)
    seen = []

    class Recorder:  # the pixels the model would get
        dim = 4

        def embed_arrays(self, px):
            seen.append(px)
            return np.zeros((len(px), 4), np.float32)
    emb.encoders = [Recorder()]
    for source in (str(path), path.read_bytes(), None):
        seen.clear()
        emb.embed([("B", load_rgb(path))], sources=None if source is None else {"B": source})
        same = len(seen[0]) == len(batch) and all(np.array_equal(a, b) for a, b in zip(seen[0], batch))
        assert same == (source is not None)  # without its source the full decode gives other pixels

def test_shape_buckets_batch_aspect_kept_patches_and_keep_descriptors():
    assert resized_size((400, 300), "short_side", 288, bucket=32) == (384, 288)
    assert resized_size((410, 300), "short_side", 288, bucket=32) == (384, 288)  # 393.6 -> 384
    assert resized_size((300, 460), "short_side", 288, bucket=32) == (288, 448)  # 441.6 -> 448
    assert resized_size((300, 460), "long_side", 224, bucket=32) == (160, 224)   # 146.1 -> 160
    assert resized_size((300, 460), "square", 224, bucket=32) == (224, 224)
    card = backbone_card("resnet18").model_copy(update={"resize": "short_side"})
    rng = np.random.default_rng(1)
    sizes = [(int(w), int(h)) for w, h in zip(rng.integers(380, 420, 12), rng.integers(290, 310, 12))]
    patches = [synthetic_photo(i, size) for i, size in enumerate(sizes)]
    exact, bucketed = build_encoder(card, 96), build_encoder(card, 96)
    bucketed.pre = Preprocess.for_card(card, 96, bucket=32)
    calls = []
    forward = bucketed.forward
    bucketed.forward = lambda x: calls.append(len(x)) or forward(x)
    a, b = exact.embed(patches), bucketed.embed(patches)
    assert len({p.resize(im).shape for p, im in [(exact.pre, x) for x in patches]}) > 3  # exact: many shapes
    assert calls == [12]  # bucketed: one shape, one batch
    cosine = (a * b).sum(axis=1)
    assert cosine.min() >= 0.99


def test_a_feature_folder_pins_the_precision_it_was_made_at():
    """bfloat16 features beside float32 ones in one folder would mix two encoders' outputs."""
    from types import SimpleNamespace

    from jobs.config import load_config
    from jobs.stages.extract import key_settings
    cfg = load_config(None, ["models.0.name=resnet18"])
    key = SimpleNamespace(scale=64, dtype="float32", pre=SimpleNamespace(bucket=0), card=SimpleNamespace(weights=None))
    assert "precision" not in key_settings(cfg, cfg.models[0], key)  # float32 folders made before stay resumable
    bf16 = cfg.models[0].model_copy(update={"precision": "bfloat16"})
    assert key_settings(cfg, bf16, key)["precision"] == "bfloat16"


def test_a_model_actor_refuses_weights_replaced_after_the_run_pinned_them(run_folders):
    """`models import --force` while a run extracted: the actors loaded the new file, and its features
    were written under the old weights' hash (exit 0, another model's results)."""
    from core.models.backbones import build_backbone
    from core.models.cards import RegistryError
    from core.models.checkpoint import save_checkpoint
    from core.models.registry import weights_hash
    from core.models.resolve import card_from_checkpoint
    root, _ = run_folders
    path = root / "w.safetensors"
    save_checkpoint(build_backbone("tiny_cnn", dim=16, seed=1), path)
    card = card_from_checkpoint(path)
    pinned = card.model_copy(update={"weights_sha256": weights_hash(card)})  # as key_specs pins it
    keys = [pe.KeySpec(pinned, Preprocess.for_card(pinned, 32), str(root / "f"), "w", 32)]
    assert pe.build_encoders(keys)
    save_checkpoint(build_backbone("tiny_cnn", dim=16, seed=2), path)  # the same name, other weights
    with pytest.raises(RegistryError, match=f"{path} changed since the card was written"):
        pe.build_encoders(keys)


def test_a_failed_model_actor_is_one_line_naming_why(run_folders):
    """The stage's error carried Ray's whole remote traceback; weights replaced under a running stage
    are named as such."""
    from core.models.backbones import build_backbone
    from core.models.cards import RegistryError
    from core.models.checkpoint import save_checkpoint
    from core.models.registry import weights_hash
    from core.models.resolve import card_from_checkpoint
    from jobs.stages.extract import actor_failure
    root, _ = run_folders
    path = root / "w.safetensors"
    save_checkpoint(build_backbone("tiny_cnn", dim=16, seed=1), path)
    card = card_from_checkpoint(path)
    keys = [pe.KeySpec(card.model_copy(update={"weights_sha256": weights_hash(card)}),
                       Preprocess.for_card(card, 32), str(root / "f"), "w", 32)]

    class Died(Exception):
        actor_init_failed = True
    died = Died("The actor died because of an error raised in its creation task\nTraceback ...\n  File x\n"
                "ImportError: no module named onnxruntime\n")
    assert str(actor_failure(died, keys, 3)) == \
        "extract: the model actor could not start (ImportError: no module named onnxruntime)"
    Died.actor_init_failed = False
    assert str(actor_failure(died, keys, 3)).startswith("extract: a chunk's model actor died 4 times (out of memory?")
    Died.actor_init_failed = True
    save_checkpoint(build_backbone("tiny_cnn", dim=16, seed=2), path)
    with pytest.raises(RegistryError, match="changed since the card was written"):
        actor_failure(died, keys, 3)
