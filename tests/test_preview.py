"""The patch preview: a contact sheet with coloured, labelled boxes and an HTML table."""
import numpy as np
import pyarrow as pa
from PIL import Image

from core.contracts import MANIFEST_SCHEMA, PATCHES_SCHEMA
from patchers.preview import (
    CAPTION,
    KIND_COLOURS,
    PAD,
    THUMB,
    contact_sheet,
    draw_patches,
    pick_images,
    write_preview,
)


def _patch(image_id, pid, kind, box, rotation=0, flip=False, score=1.0):
    return {"image_id": image_id, "patch_id": pid, "kind": kind, "x0": box[0], "y0": box[1], "x1": box[2],
            "y1": box[3], "rotation": rotation, "flip": flip, "source_score": score}


def _manifest(tmp_path, specs):
    rows = []
    for image_id, split in specs:
        path = tmp_path / f"{image_id}.png"
        Image.new("RGB", (200, 100), (0, 0, 0)).save(path)
        rows.append({"image_id": image_id, "path": str(path), "split": split, "width": 200, "height": 100,
                     "sha256": "x"})
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def test_boxes_are_drawn_in_their_kind_colour():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    thumb = draw_patches(img, [_patch("a", 0, "full", (0, 0, 1, 1)),
                               _patch("a", 1, "detection", (0.5, 0.5, 1.0, 1.0), score=0.7)])
    assert thumb.size == (THUMB, THUMB // 2)
    # the detection's left edge at x = 0.5 * 256, lower half of the image, away from its label
    assert thumb.getpixel((128, 110)) == KIND_COLOURS["detection"]
    assert thumb.getpixel((0, 60)) == KIND_COLOURS["full"]
    assert thumb.getpixel((60, 60)) == (0, 0, 0)


def test_the_full_outline_and_every_label_stay_visible_where_boxes_share_a_corner():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    thumb = draw_patches(img, [_patch("a", 0, "full", (0, 0, 1, 1)), _patch("a", 1, "crop", (0, 0, 0.6, 0.6)),
                               _patch("a", 2, "tile", (0, 0, 0.5, 0.5))])
    assert thumb.getpixel((0, 40)) == KIND_COLOURS["full"]  # the left edge all three share

    def tone(px: tuple[int, int, int]) -> str | None:  # the label text is anti-aliased: its hue, not its value
        r, g, b = px
        return ("crop" if b > g > r + 80 else "tile" if g > max(r, b) + 80 else
                "full" if min(px) > 150 else None)

    first_row = {}
    for y in range(3, 40):  # below the top outline
        for x in range(3, 60):
            first_row.setdefault(tone(thumb.getpixel((x, y))), y)
    assert first_row["crop"] < first_row["tile"] < first_row["full"]  # three labels, one under another


def test_pick_images_alternates_splits():
    rows = [("Q1", "query"), ("Q2", "query"), ("Q3", "query"), ("R1", "reference"), ("T1", "train")]
    m = pa.Table.from_pylist([{"image_id": i, "path": "", "split": s, "width": 1, "height": 1, "sha256": ""}
                              for i, s in rows], schema=MANIFEST_SCHEMA)
    assert [r["image_id"] for r in pick_images(m, 4)] == ["Q1", "R1", "T1", "Q2"]
    assert len(pick_images(m, 50)) == 5


def test_write_preview_makes_png_and_html(tmp_path):
    manifest = _manifest(tmp_path, [("Q1", "query"), ("R1", "reference"), ("R2", "reference")])
    patches = {"query": pa.Table.from_pylist(
        [_patch("Q1", 0, "full", (0, 0, 1, 1)), _patch("Q1", 1, "rotation", (0, 0, 1, 1), rotation=90),
         _patch("Q1", 2, "proposal", (0.1, 0.1, 0.4, 0.6), score=0.5),
         _patch("R1", 0, "full", (0, 0, 1, 1))], schema=PATCHES_SCHEMA),  # a query with a reference's id
        "reference": pa.Table.from_pylist(
        [_patch("R1", 0, "full", (0, 0, 1, 1)), _patch("R1", 1, "tile", (0, 0, 0.5, 0.5))], schema=PATCHES_SCHEMA)}
    png, page = write_preview(manifest, patches, 2, tmp_path / "run")
    sheet = Image.open(png).convert("RGB")
    assert sheet.size == contact_sheet([Image.new("RGB", (1, 1))] * 2).size
    below = np.asarray(sheet)[PAD + THUMB:PAD + THUMB + CAPTION, PAD:PAD + THUMB]  # under the first thumbnail
    assert (below > 200).all(axis=-1).any(), "each thumbnail is captioned with its image id"
    text = page.read_text()
    assert "Q1 (query, 3 patches)" in text and "R1 (reference, 2 patches)" in text and "<h3>R2" not in text
    assert text.count("<tr>") == 3 + 2 + 2  # header + rows per image
    assert "proposal" in text and "0.500" in text
