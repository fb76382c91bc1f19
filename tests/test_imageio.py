"""load_rgb / image_size / sha256_file on awkward inputs (tests/badimages.py) and on alpha/palette modes."""
import hashlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from core.imageio import ImageDecodeError, image_size, load_rgb, sha256_file
from tests.badimages import CORNER, EXPECTED, make_bad_images

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
