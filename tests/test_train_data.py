"""Training data path: photos stream from files (bounded memory, bad files replaced), decoded by
the pipeline's decoder, and validation input equals extraction input for the same file."""
import concurrent.futures
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.imageio import ImageDecodeError, load_rgb
from core.models.backbones import build_backbone
from tests.badimages import EXPECTED, make_bad_images
from tests.conftest import synthetic_photo

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parent.parent
RSS_MARGIN_MB = 40  # the 10x larger run may use this much more (measured: +11 MB; decoding
# all photos up front, as training did before, measured +310 MB)


def tiny_spec(train: Path, tmp: Path, **data):
    from pretrain.train_config import (
        DataSection,
        ModelSection,
        PretrainSection,
        RunSpec,
    )

    return RunSpec(
        kind="byol", name="tiny-stream", backbone="tiny_cnn", recipe="byol_views", run_dir=str(tmp / "run"),
        registry=str(tmp / "registry"), seed=0, data=DataSection(train=str(train), **data),
        model=ModelSection(dim=16, img_size=32), torch_threads=1,
        pretrain=PretrainSection(epochs=1, batch_size=8, steps_per_epoch=4, proj_hidden=32, proj_dim=16,
                                 pred_hidden=32),
    )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_load_rgb_max_side_shrinks_like_thumbnail_and_fails_alike(tmp_path, name):
    path = make_bad_images(tmp_path)[name]
    if EXPECTED[name]["error"]:
        with pytest.raises(ImageDecodeError, match=EXPECTED[name]["reason"]):
            load_rgb(path, max_side=32)
        return
    full = load_rgb(path)
    assert np.array_equal(np.asarray(load_rgb(path, max_side=1000)), np.asarray(full))  # small: untouched
    small = load_rgb(path, max_side=32)
    expected = full.copy()
    expected.thumbnail((32, 32), Image.Resampling.BILINEAR)
    assert small.mode == "RGB" and small.size == expected.size and max(small.size) == 32


def test_load_rgb_max_side_decodes_large_jpegs_at_reduced_size(tmp_path):
    path = tmp_path / "big.jpg"
    synthetic_photo(1, (1600, 1200)).save(path, quality=90)
    small = load_rgb(path, max_side=100)
    expected = load_rgb(path)
    expected.thumbnail((100, 100), Image.Resampling.BILINEAR)
    assert small.size == expected.size == (100, 75)
    assert np.abs(np.asarray(small, np.int16) - np.asarray(expected, np.int16)).mean() < 4


@pytest.fixture
def messy_dir(tmp_path) -> Path:
    """10 photos, 2 files that do not decode and 2 that decode too small or thin to edit (sorted among them)."""
    folder = tmp_path / "messy"
    folder.mkdir()
    for i in range(10):
        synthetic_photo(700 + i, (64, 48)).save(folder / f"P{i:03d}.jpg")
    (folder / "P003b.jpg").write_bytes(b"not a jpeg")
    good = (folder / "P004.jpg").read_bytes()
    (folder / "P005b.jpg").write_bytes(good[: len(good) // 2])
    synthetic_photo(1, (12, 12)).save(folder / "P006b.png")
    synthetic_photo(2, (120, 40)).resize((120, 8)).save(folder / "P007b.png")  # the recipes' crops fail on a strip
    return folder


def test_split_lists_files_and_training_replaces_bad_ones(messy_dir, tmp_path, caplog):
    from pretrain.data import CopyViews
    from pretrain.photos import BadPhotos, LazyPhotos
    from pretrain.recipes import get_recipe
    from pretrain.train.byol import train_local
    from pretrain.train.common import TooManyBadPhotos, preprocess_for, split_photos
    from pretrain.train.session import LocalSession

    spec = tiny_spec(messy_dir, tmp_path, val_photos=2, val_distractors=1, max_side=64)
    train, val, distractors = split_photos(spec, LocalSession(spec.run_dir))  # nothing decoded: bad files are listed
    assert (len(train), len(val), len(distractors)) == (11, 2, 1)
    assert sorted(i for i, _ in [*train, *val, *distractors]) == sorted(p.stem for p in messy_dir.iterdir())

    bad = [i for i, (_, path) in enumerate(train) if Path(path).stem.endswith("b")]
    backbone = build_backbone("tiny_cnn", dim=16, img_size=32)
    ds = CopyViews(LazyPhotos(train, 64), get_recipe("basic"), views=2, pre=preprocess_for(spec, backbone), seed=0)
    with caplog.at_level(logging.WARNING, logger="pretrain.photos"):
        for i in bad:
            views, label = ds[i]
            assert views.shape == (2, 3, 32, 32) and label != i and label not in bad
            assert train[i][1] in caplog.text  # the warning names the file

    # every file in training: 4 of 14 bad is more than the default cap allows, and the run stops before it checkpoints
    with pytest.raises(TooManyBadPhotos, match=r"4 of 14 photos .*data.max_bad_fraction=0.05.*listed in .*bad-photos"):
        train_local(tiny_spec(messy_dir, tmp_path, max_side=64))
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(TooManyBadPhotos, match=r"4 of 14 photos"):  # a restart stops before it trains again
        train_local(tiny_spec(messy_dir, tmp_path, max_side=64))
    events = [json.loads(line)["event"] for line in open(tmp_path / "run" / "events.jsonl")]
    assert events == ["start"]  # the first attempt's; the restart stopped before its start
    metrics = train_local(tiny_spec(messy_dir, tmp_path, max_side=64, max_bad_fraction=0.5))  # the cap is not pinned
    recorded = BadPhotos(tmp_path / "run" / "bad-photos").reasons()
    assert metrics["epoch"] == 0 and metrics["loss"] == metrics["loss"] and metrics["bad_photos"] == len(recorded) > 0
    assert {Path(p).stem for p in recorded} <= {Path(train[i][1]).stem for i in bad}, recorded
    assert all(reason for reason in recorded.values())


def test_photos_are_judged_at_their_decoded_size_not_at_max_side(tmp_path, caplog):
    """A 223 x 93 photo shrinks to 64 x 27 at max_side 64, under the 32 px a photo needs: it is
    still trained on, as it decodes larger; a photo that decodes under 32 px is replaced, named
    with its decoded size."""
    from pretrain.photos import BadPhotos, LazyPhotos, PhotoFiles

    paths = [tmp_path / "wide.jpg", tmp_path / "small.png", tmp_path / "good.jpg"]
    for (w, h), path in zip([(223, 93), (20, 20), (64, 48)], paths):
        synthetic_photo(5, (w, h)).save(path)
    record = BadPhotos(tmp_path / "bad-photos")
    photos = LazyPhotos(PhotoFiles([p.stem for p in paths], paths), max_side=64, record=record)
    index, photo = photos.photo(0)
    assert index == 0 and photo.image.size == (64, 27)
    with caplog.at_level(logging.WARNING, logger="pretrain.photos"):
        assert photos.photo(1)[0] != 1
    assert "20 x 20 px is too small or too thin" in caplog.text and list(record.reasons()) == [str(paths[1])]


def test_a_bad_photo_deleted_or_repaired_since_no_longer_counts(messy_dir, tmp_path):
    from pretrain.train.byol import train_local
    from pretrain.train.common import TooManyBadPhotos
    with pytest.raises(TooManyBadPhotos, match="4 of 14 photos"):
        train_local(tiny_spec(messy_dir, tmp_path, max_side=64))
    bad = sorted(messy_dir.glob("*b.*"))
    bad[0].unlink()
    for i, f in enumerate(bad[1:]):  # repaired in place: same name, good pixels
        synthetic_photo(40 + i).save(f, format="PNG" if f.suffix == ".png" else "JPEG")
    assert train_local(tiny_spec(messy_dir, tmp_path, max_side=64))["bad_photos"] == 0  # a fresh start on 13


def test_validation_input_equals_extraction_input(tmp_path):
    """The same files through training validation and through extraction (the Embedder's
    full-image patch) give identical model input arrays."""
    from core.models.encoders import build_encoder
    from patchers.extract import cut_patch
    from core.imageio import ImageDecodeError
    from pretrain.photos import PhotoFiles, usable
    from pretrain.recipes import get_recipe
    from pretrain.train.common import preprocess_for
    from pretrain.train.registration import run_card
    from pretrain.train.validate import make_validation_set

    files = make_bad_images(tmp_path / "odd")
    names = [n for n in sorted(EXPECTED) if not EXPECTED[n]["error"]]
    big = tmp_path / "odd" / "big_rotated.jpg"  # larger than max_side, EXIF-rotated
    exif = Image.Exif()
    exif[0x0112] = 8
    synthetic_photo(3, (300, 200)).save(big, quality=90, exif=exif.tobytes())
    rgba = tmp_path / "odd" / "alpha.png"  # transparency: flattened on white by load_rgb
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 4), np.uint8), "RGBA").save(rgba)
    paths = [str(files[n]) for n in names] + [str(big), str(rgba)]

    spec = tiny_spec(tmp_path / "odd", tmp_path, max_side=64)
    backbone = build_backbone(spec.backbone, dim=spec.model.dim, img_size=spec.model.img_size)
    val = make_validation_set(PhotoFiles([Path(p).stem for p in paths], paths), PhotoFiles([], []),
                              get_recipe("basic"), pre=preprocess_for(spec, backbone), max_side=spec.data.max_side)
    def fits(path: str) -> bool:
        try:
            usable(load_rgb(path), path)
        except ImageDecodeError:
            return False
        return True

    # left out as training leaves them out: too small or thin as decoded (ok_gray16.png, 64 x 16 at max_side, is in)
    assert set(val.reference_ids) == {Path(p).stem for p in paths if fits(p)} and "ok_gray16" in val.reference_ids

    encoder = build_encoder(run_card(spec, backbone), spec.model.img_size)  # the registered model's card
    row_of = {image_id: row for row, image_id in enumerate(val.reference_ids)}
    for path in paths:
        if Path(path).stem not in row_of:
            continue
        row = row_of[Path(path).stem]
        patch = cut_patch(load_rgb(path), (0.0, 0.0, 1.0, 1.0))
        extracted = encoder.pre.to_input(np.stack([encoder.pre.resize(patch)]))
        assert extracted.dtype == np.float32
        assert np.array_equal(val.model_input(val.references[row : row + 1]).numpy(), extracted), path


CHILD = """
import json, multiprocessing as mp, os, resource, sys
from pretrain import data
from pretrain.train.byol import train_local
from pretrain.train_config import RunSpec

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

trainer, worker_peak, make_item = os.getpid(), mp.Value("d", 0.0), data.CopyViews.__getitem__

def measured_item(self, i):  # runs in the (forked) loader worker: record its own peak
    item = make_item(self, i)
    if os.getpid() != trainer:
        worker_peak.value = max(worker_peak.value, peak_mb())
    return item

data.CopyViews.__getitem__ = measured_item
metrics = train_local(RunSpec.model_validate_json(sys.argv[1]))
print(json.dumps({"epoch": metrics["epoch"], "trainer": peak_mb(), "worker": worker_peak.value}))
"""


def write_photos(folder: Path, count: int, variants: list[bytes]) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"I{i:06d}.jpg").write_bytes(variants[i % len(variants)])
    return folder


def test_peak_rss_does_not_grow_with_the_photo_count(tmp_path):
    """The same 4-step BYOL run (one loader worker) on 2,000 and on 20,000 64x64 photos: peak RSS
    of the trainer and of its loader worker stay within RSS_MARGIN_MB (holding the decoded photos
    would add over 12 KB each, 220+ MB for the 18,000 more)."""
    variants = []
    for seed in range(32):
        buf = io.BytesIO()
        synthetic_photo(seed, (64, 64)).save(buf, "JPEG", quality=85)
        variants.append(buf.getvalue())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runs = {}
    for count in (2_000, 20_000):
        spec = tiny_spec(write_photos(tmp_path / f"p{count}", count, variants), tmp_path / f"r{count}", max_side=64)
        spec = spec.model_copy(update={"loader_workers": 1})
        runs[count] = subprocess.Popen([sys.executable, "-c", CHILD, spec.model_dump_json()], cwd=tmp_path,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {}
    for count, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        peaks[count] = json.loads(out.strip().splitlines()[-1])
        assert peaks[count]["epoch"] == 0
    print("peak RSS MB:", json.dumps(peaks))
    for who in ("trainer", "worker"):
        small, large = peaks[2_000][who], peaks[20_000][who]
        assert small > 50 and large - small < RSS_MARGIN_MB, (who, peaks)


def test_photo_arrays_are_computed_once_per_key_and_read_memory_mapped(tmp_path):
    """A resumed run reuses the file its key names; another photo list or setting computes it
    again; a file whose sidecar is missing (a killed writer) is not trusted."""
    from pretrain.photo_arrays import files_key, photo_array
    from pretrain.photos import PhotoFiles
    files = PhotoFiles([f"P{i}" for i in range(10)], [f"/p/P{i}.jpg" for i in range(10)])
    calls = []

    def rows(a: int, b: int) -> np.ndarray:
        calls.append((a, b))
        return np.arange(a, b, dtype=np.float32)[:, None].repeat(3, 1) * scale

    path, scale = tmp_path / "run" / "tokens.npy", 1.0
    key = files_key(files, "model-a", 128)
    first = photo_array(path, key, 10, rows, batch=4)
    assert calls == [(0, 4), (4, 8), (8, 10)] and isinstance(first, np.memmap)
    assert first.shape == (10, 3) and first[7, 2] == 7
    assert photo_array(path, key, 10, rows, batch=4)[9, 0] == 9 and len(calls) == 3  # reused, not recomputed
    assert key != files_key(files, "model-b", 128) != files_key(files.take([1, 0]), "model-a", 128)
    scale = 2.0
    assert photo_array(path, files_key(files, "model-b", 128), 10, rows, batch=4)[9, 0] == 18 and len(calls) == 6
    (tmp_path / "run" / "tokens.npy.json").unlink()
    assert photo_array(path, files_key(files, "model-b", 128), 10, rows, batch=4)[9, 0] == 18 and len(calls) == 9
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokens.npy", "tokens.npy.json"]  # no temp file left

    # the other workers of a run wait for the one that computes, and compute nothing themselves
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(photo_array, path, files_key(files, "model-c", 128), 10, rows, 4, False, 0.01)
        scale = 3.0
        assert not waiting.done() and len(calls) == 9
        assert photo_array(path, files_key(files, "model-c", 128), 10, rows, batch=4)[9, 0] == 27
        assert waiting.result(timeout=30)[9, 0] == 27 and len(calls) == 12

    # a computation killed after its second batch goes on from the third, for the same key only
    def killed(a: int, b: int) -> np.ndarray:
        if a == 8:
            raise KeyboardInterrupt("killed")
        return rows(a, b)

    scale, calls[:] = 4.0, []
    with pytest.raises(KeyboardInterrupt):
        photo_array(path, files_key(files, "model-d", 128), 10, killed, batch=4)
    assert calls == [(0, 4), (4, 8)] and not (tmp_path / "run" / "tokens.npy.json").exists()
    resumed = photo_array(path, files_key(files, "model-d", 128), 10, rows, batch=4)
    assert calls == [(0, 4), (4, 8), (8, 10)] and np.array_equal(resumed, np.arange(10)[:, None].repeat(3, 1) * 4.0)
    with pytest.raises(KeyboardInterrupt):
        photo_array(path, files_key(files, "model-e", 128), 10, killed, batch=4)
    calls[:] = []
    assert photo_array(path, files_key(files, "model-f", 128), 10, rows, batch=4)[9, 0] == 36 and len(calls) == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokens.npy", "tokens.npy.json"]


def test_a_photo_a_recipe_fails_on_is_replaced_and_named(messy_dir, caplog):
    """A recipe's edits depend on (seed, photo, epoch) only: a photo it fails on would fail on every
    retry, so it is replaced like one that does not decode, and the log names the file."""
    from pretrain.photos import LazyPhotos, PhotoFiles
    from pretrain.recipes import RecipeError
    files = PhotoFiles.from_folder(messy_dir)
    photos = LazyPhotos(files, 64)

    def edit(index: int, photo) -> str:
        if photo.image_id == "P001":
            raise RecipeError("recipe 'heavy': op 'overlay_text' failed on a (15, 187) image")
        return photo.image_id

    first = [i for i, (image_id, _) in enumerate(files) if image_id == "P001"][0]
    with caplog.at_level(logging.WARNING, logger="pretrain.photos"):
        index, edited = photos.edited(first, edit)
    assert index != first and edited == files[index][0] != "P001"
    assert f"{files[first][1]}: recipe 'heavy'" in caplog.text
    assert photos.edited(first, edit) == (index, edited)  # the same replacement every time


def test_a_replaced_photo_is_never_mined_as_a_hard_negative(messy_dir):
    """A photo that does not decode holds its replacement's pixels: as a neighbour it would be a
    "non-copy" identical to the copy's original. Its miner row is zero and mining skips it."""
    from pretrain.pairs import embed_photos, nearest_others
    from pretrain.photos import LazyPhotos, PhotoFiles

    class MeanColour:  # a miner: the normalised mean colour and its square
        def embed(self, images):
            x = np.stack([np.asarray(im, np.float32).mean((0, 1)) for im in images])
            x = np.hstack([x, x**2 / 255])
            return x / np.linalg.norm(x, axis=1, keepdims=True)

    files = PhotoFiles.from_folder(messy_dir)
    photos = LazyPhotos(files, 64)
    desc = embed_photos(photos, MeanColour(), range(len(files)), batch=5)
    replaced = {i for i, (image_id, _) in enumerate(files) if image_id.endswith("b")}
    assert {i for i in range(len(files)) if not desc[i].any()} == replaced
    near = nearest_others(desc, k=3)
    assert near.shape == (len(files), 3)
    assert not replaced & set(near.ravel().tolist())
    assert all(i not in row for i, row in enumerate(near.tolist()))


def test_a_second_process_cannot_train_into_a_run_folder_in_use(messy_dir, tmp_path):
    """Two processes resuming one run folder would interleave checkpoints and best files: the
    second is refused at once, naming the holder, and writes nothing."""
    from core.lock import FolderBusy
    from pretrain.train.launch import fit_local
    from tests.test_lock import hold

    spec = tiny_spec(messy_dir, tmp_path, max_side=64, max_bad_fraction=0.5)
    holder = hold(Path(spec.run_dir))
    try:
        with pytest.raises(FolderBusy, match=rf"in use by pid {holder.pid} .*train into another output folder"):
            fit_local(spec)
        assert sorted(p.name for p in Path(spec.run_dir).iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert fit_local(spec)["epoch"] == 0  # freed with its holder


def test_an_epoch_prints_its_progress_on_rank_0(capsys):
    """Within an epoch (hours at DISC21 scale) rank 0 prints where it is; the other ranks are quiet."""
    from types import SimpleNamespace

    from pretrain.train.common import steps_of

    losses: list[float] = []
    for rank in (0, 1):
        losses.clear()
        seen = []
        for step, batch in steps_of(SimpleNamespace(rank=rank), 3, iter("abcdefgh"), 5, losses, every_s=0.0):
            seen.append((step, batch))
            losses.append(float(step))
        assert seen == [(0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "e")]  # the epoch's first 5 batches
        lines = capsys.readouterr().out.splitlines()
        if rank == 0:
            assert lines[0].startswith("epoch 3: step 1/5, loss 0, ") and lines[-1].startswith("epoch 3: step 5/5, loss 2,")
            assert len(lines) == 5 and all(line.endswith(" min left") for line in lines)
        else:
            assert lines == []
    from core.logs import ProgressLines
    resumed = ProgressLines("tokens.npy: rows", 10, every_s=0.0, start=4)  # a resumed loop: its rate counts new rows
    resumed.tick(4)
    resumed.tick(6)
    assert capsys.readouterr().out.splitlines() == ["tokens.npy: rows 6/10, 0.0 min left"]


def test_rank_0_lists_the_photos_and_the_other_ranks_train_on_its_list(messy_dir, tmp_path):
    """One listing per start, kept in RUN/photos.parquet: a rank that starts after a file arrived
    still trains on rank 0's list (a different list would misalign labels and class counts)."""
    from types import SimpleNamespace

    from core.store import read_table
    from pretrain.photos import PhotoFiles
    from pretrain.train.common import listed_photos

    spec = tiny_spec(messy_dir, tmp_path)
    waited = []
    rank0 = listed_photos(spec, SimpleNamespace(rank=0, barrier=lambda: waited.append(0)))
    synthetic_photo(5).save(messy_dir / "P999.jpg")  # arrives before rank 1 reads the list
    rank1 = listed_photos(spec, SimpleNamespace(rank=1, barrier=lambda: waited.append(1)))
    assert waited == [0, 1] and list(rank1) == list(rank0) == list(PhotoFiles.from_folder(messy_dir))[:-1]
    assert read_table(tmp_path / "run" / "photos.parquet").column("image_id").to_pylist()[0] == b"P000"

    odd = PhotoFiles(["a", os.fsdecode(b"x\xff"), ""], ["/p/a.jpg", os.fsdecode(b"/p/x\xff.jpg"), "/p/.jpg"])
    table = odd.to_table()  # binary columns: a file name need not be UTF-8
    assert list(PhotoFiles.from_table(table)) == list(odd)
    assert list(PhotoFiles.from_table(table.slice(1, 2))) == list(odd)[1:]
    assert len(PhotoFiles.from_table(table.slice(0, 0))) == 0
