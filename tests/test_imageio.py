"""load_rgb / image_size / sha256_file on awkward inputs (tests/badimages.py) and on alpha/palette modes."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from core.imageio import ImageDecodeError, image_size, list_images, load_rgb, scan_images, sha256_file
from tests.badimages import CORNER, EXPECTED, grey_ramp, make_bad_images

BAD = sorted(name for name, spec in EXPECTED.items() if spec["error"])
GOOD = sorted(name for name, spec in EXPECTED.items() if not spec["error"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_bad_images(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", BAD)
def test_bad_file_raises_naming_file_and_reason(files, name):
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(files[name])
    msg = str(info.value)
    assert str(files[name]) in msg and EXPECTED[name]["reason"] in msg
    assert isinstance(info.value, ValueError) and info.value.path == str(files[name])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the decoder never relaxes PIL globally


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_rgb(tmp_path / "nope.jpg")


@pytest.mark.parametrize("name", GOOD)
def test_good_file_loads_with_expected_size(files, name):
    img = load_rgb(files[name])
    assert img.mode == "RGB" and img.size == EXPECTED[name]["size"]
    assert image_size(files[name]) == EXPECTED[name]["size"]


@pytest.mark.parametrize("name", ["text", "empty"])
def test_image_size_fails_on_non_images(files, name):
    with pytest.raises(ImageDecodeError, match=EXPECTED[name]["reason"]):
        image_size(files[name])


def test_cmyk_becomes_cyan_and_white(files):
    arr = np.asarray(load_rgb(files["cmyk"]), np.int16)
    left, right = arr[:, 5:30].reshape(-1, 3).mean(0), arr[:, 50:75].reshape(-1, 3).mean(0)
    assert np.abs(left - [0, 255, 255]).max() < 12
    assert np.abs(right - [255, 255, 255]).max() < 12


def test_sixteen_bit_gradient_keeps_its_range(files):
    arr = np.asarray(load_rgb(files["gray16"]), np.int16)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()  # grey
    row = arr[0, :, 0]
    assert row.min() <= 1 and row.max() >= 254
    assert (np.diff(row) >= 0).all()  # still a ramp, not clipped to white
    expected = np.rint(np.linspace(0, 65535, row.size) / 257)  # brute force 16 -> 8 bit
    assert np.abs(row - expected).max() <= 1
    assert abs(np.median(row) - 127.5) < 3


@pytest.mark.parametrize("name", ["float01", "int32"])
def test_float_and_32_bit_tiffs_decode_to_their_grey_values(files, name):
    arr = np.asarray(load_rgb(files[name]))
    assert np.array_equal(arr, np.repeat(grey_ramp(EXPECTED[name]["size"])[..., None], 3, axis=2))
    small = np.asarray(load_rgb(files[name], max_side=32), np.float64)  # the reduced decode agrees
    assert small.shape == (8, 32, 3) and abs(small.mean() - arr.mean()) < 1


@pytest.mark.parametrize(("pixels", "expected"), [
    (np.array([[0, 1000, 65535]], np.int32), [0, 4, 255]),  # 16-bit data in a 32-bit image: / 257
    (np.array([[-50, 0, 50]], np.int32), [0, 128, 255]),  # fits no range: its own min..max
    (np.array([[7, 7, 7]], np.int32), [7, 7, 7]),
    (np.array([[0, 127.5, 255]], np.float32), [0, 128, 255]),  # 8-bit data as floats
    (np.array([[-1, 0, 3]], np.float32), [0, 64, 255]),
    (np.array([[2e6, 2e6, 2e6]], np.float32), [0, 0, 0]),  # constant out of range: black, no 0 / 0
    (np.array([[np.nan, 0.5, 1]], np.float32), [0, 128, 255]),
])
def test_wide_grey_values_map_by_their_range(tmp_path, pixels, expected):
    path = tmp_path / "grey.tif"
    Image.fromarray(pixels).save(path)
    assert np.asarray(load_rgb(path))[0, :, 1].tolist() == expected


def test_sixteen_bit_tiff_keeps_dividing_by_257(tmp_path):
    path = tmp_path / "dark16.tif"
    Image.fromarray(np.array([[0, 200, 1000, 65535]], np.uint16)).save(path)  # mode I;16, even when dark
    assert np.asarray(load_rgb(path))[0, :, 0].tolist() == [0, 1, 4, 255]


def test_exif_rotation_moves_the_red_corner(files):
    img = load_rgb(files["exif_rotated"])
    w, h = img.size
    assert (w, h) == (48, 80)  # stored 80x48, orientation 6 swaps width and height
    arr = np.asarray(img, np.int16)
    inner = slice(3, CORNER - 3)
    top_right = arr[inner, w - CORNER + 3:w - 3].reshape(-1, 3).mean(0)
    top_left = arr[inner, inner].reshape(-1, 3).mean(0)
    assert np.abs(top_right - [255, 0, 0]).max() < 30  # rotated 90° clockwise for display
    assert top_left[2] > 150 and top_left[0] < 80  # the blue background, not red


def _half_transparent(mode: str) -> tuple[Image.Image, dict]:
    """20x10: left half opaque black, right half fully transparent (magenta under the alpha)."""
    if mode == "P":
        img = Image.new("P", (20, 10), 1)
        img.putpalette([0, 0, 0, 255, 0, 255])
        img.paste(0, (0, 0, 10, 10))
        return img, {"transparency": 1}
    img = Image.new("RGBA", (20, 10), (255, 0, 255, 0))
    img.paste((0, 0, 0, 255), (0, 0, 10, 10))
    return img.convert(mode), {}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_flattened_on_white(tmp_path, mode):
    img, save_args = _half_transparent(mode)
    path = tmp_path / f"alpha_{mode}.png"
    img.save(path, **save_args)
    arr = np.asarray(load_rgb(path))
    assert (arr[:, :10] == 0).all() and (arr[:, 10:] == 255).all()


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L").save(path)
    arr = np.asarray(load_rgb(path))
    assert arr.shape == (8, 8, 3) and (arr[..., 0] == arr[..., 2]).all() and arr[7, 7, 1] == 252


def test_sha256_matches_hashlib(files):
    data = files["good"].read_bytes()
    assert sha256_file(files["good"]) == hashlib.sha256(data).hexdigest()
    assert sha256_file(files["good"], chunk_size=7) == hashlib.sha256(data).hexdigest()  # chunking


def test_files_are_reproducible(tmp_path):
    a, b = make_bad_images(tmp_path / "a"), make_bad_images(tmp_path / "b")
    assert all(a[n].read_bytes() == b[n].read_bytes() for n in EXPECTED)


def test_non_images_are_reported_after_ultralytics_patches_pil(files):
    """ultralytics replaces PIL.Image.open on import (HEIF fallback via pi-heif)."""
    import ultralytics.utils.patches  # noqa: F401
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_rgb(files["text"])


def test_a_pixel_cap_drafts_jpegs_and_refuses_other_images(tmp_path):
    big = Image.new("RGB", (800, 600), (200, 30, 30))
    big.save(tmp_path / "big.jpg", quality=90)
    big.save(tmp_path / "big.png")
    assert load_rgb(tmp_path / "big.jpg", max_pixels=130_000).size == (400, 300)  # 1/2 per side
    assert load_rgb(tmp_path / "big.jpg", max_pixels=10_000).size == (100, 75)    # 1/8 is as far as it goes
    with pytest.raises(ImageDecodeError, match=r"big\.png: too many pixels \(800x600 = 480,000; the cap max_pixels"):
        load_rgb(tmp_path / "big.png", max_pixels=130_000)
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        load_rgb(tmp_path / "big.jpg", max_pixels=5_000)
    assert load_rgb(tmp_path / "big.jpg", draft_side=200).size == (200, 150)  # 1/4 keeps >= 200
    assert load_rgb(tmp_path / "big.jpg", draft_side=500).size == (800, 600)  # 1/2 would be < 500
    assert load_rgb(tmp_path / "big.png", draft_side=100).size == (800, 600)  # draft is for JPEGs only


def test_jpegs_of_any_size_down_to_one_pixel_decode(tmp_path):
    """Pillow's own bomb check refuses over 179 MP at open, before the draft could reduce a photo of a
    200 MP phone; a 1 x 1 JPEG must not be drafted to nothing."""
    Image.new("L", (16384, 11000), 128).save(tmp_path / "huge.jpg", quality=50)  # 180 MP, 2 MB
    assert load_rgb(tmp_path / "huge.jpg", draft_side=512).size == (2048, 1375)
    assert load_rgb(tmp_path / "huge.jpg", max_pixels=64_000_000).size == (8192, 5500)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "one.jpg")
    assert load_rgb(tmp_path / "one.jpg").size == (1, 1)
    assert load_rgb(tmp_path / "one.jpg", max_side=64, max_pixels=100).size == (1, 1)


def test_scan_lists_every_file_as_an_image_or_a_rejection(tmp_path):
    root = tmp_path / "q"
    (root / "sub").mkdir(parents=True)
    for name in ("A.jpg", "B.JPEG", "C.jfif", "sub/D.png"):
        Image.new("RGB", (8, 8)).save(root / name, format="PNG" if name.endswith("png") else "JPEG")
    (root / "notes.txt").write_text("x")
    (root / "gone.jpg").symlink_to(root / "missing.jpg")
    (root / "self.jpg").symlink_to(root / "self.jpg")
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)
    (root / "alias.jpg").symlink_to(root / "A.jpg")
    Image.new("RGB", (8, 8)).save(root / ".PNG", format="PNG")
    scan = scan_images(root)
    assert [f.image_id for f in scan.files] == ["A", "B", "C", "alias", "sub/D"]
    assert scan.files[3].path == str((root / "A.jpg").resolve()) and scan.files[0].size > 0
    reasons = {Path(p).name: r for p, r in scan.rejected}
    assert reasons.keys() == {"notes.txt", "gone.jpg", "self.jpg", "up", ".PNG"}
    assert reasons[".PNG"] == "no name before the extension (its image id would be empty)"
    assert reasons["notes.txt"].startswith("not an image file extension (accepted: .jpg .jpeg")
    assert reasons["gone.jpg"].startswith("broken symlink") and reasons["self.jpg"] == "symlink loop"
    assert reasons["up"].startswith("symlink loop (to ")
    assert scan.duplicates() == {}
    Image.new("RGB", (8, 8)).save(root / "A.png")
    assert scan_images(root).duplicates() == {"A": [str(root / "A.jpg"), str(root / "A.png")]}
    assert list_images(root, limit=2) == [("A", str(root / "A.jpg")), ("A", str(root / "A.png"))]


def test_a_decode_error_survives_pickling():
    """Ray sends a task's exception to the driver pickled: it failed to rebuild (one argument)."""
    import pickle

    e = pickle.loads(pickle.dumps(ImageDecodeError("/x/R001.jpg", "not an image")))
    assert (str(e), e.path, e.reason) == ("/x/R001.jpg: not an image", "/x/R001.jpg", "not an image")
