"""What the patcher did, for people: a contact sheet PNG and an HTML page of patch boxes.

Each image is shown with every patch box drawn in its kind's colour and labelled with the
kind (rotations and flips of the same box share one rectangle: ``full r90 r180 flip``);
proposals, which can be hundreds, are thin unlabelled magenta boxes named by the legend.
The HTML page repeats the images, each with the table of its patches.
"""
from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from core.imageio import ImageDecodeError, load_rgb
from core.store import atomic_output, write_text
from patchers.views import FULL

KIND_COLOURS: dict[str, tuple[int, int, int]] = {
    "full": (255, 255, 255), "rotation": (255, 215, 0), "crop": (0, 200, 255),
    "tile": (80, 255, 80), "detection": (255, 40, 40), "proposal": (255, 0, 255),
}
THUMB = 256
PAD = 6
CAPTION = 14  # height of the line under each thumbnail that names its image


def _tag(kind: str, rotation: int, flip: bool, width: float) -> str:
    """Short label: the kind (crops and tiles with their width, ``tile 0.33``), or ``r90`` / ``flip``
    for a rotated / mirrored view."""
    turned = " ".join(filter(None, [f"r{rotation}" if rotation else "", "flip" if flip else ""]))
    return turned or (f"{kind} {width:.2g}" if kind in ("crop", "tile") else kind)


def draw_patches(img: Image.Image, patches: list[dict], side: int = THUMB) -> Image.Image:
    """A thumbnail (long side ``side``) with one labelled rectangle per distinct patch box: larger
    boxes first and the full image's outline last, so none hides another; labels that would start at
    one corner are stacked, not printed over each other."""
    f = side / max(img.size)
    thumb = img.convert("RGB").resize((max(1, round(img.width * f)), max(1, round(img.height * f))))
    draw = ImageDraw.Draw(thumb)
    font = ImageFont.load_default()
    boxes: dict[tuple, list[dict]] = defaultdict(list)
    for p in patches:
        boxes[(round(p["x0"], 3), round(p["y0"], 3), round(p["x1"], 3), round(p["y1"], 3))].append(p)
    w, h = thumb.size
    labels_at: dict[tuple[int, int], int] = defaultdict(int)
    order = sorted(boxes, key=lambda b: (b == FULL, -(b[2] - b[0]) * (b[3] - b[1])))
    for x0, y0, x1, y1 in order:
        group = boxes[(x0, y0, x1, y1)]
        colour = KIND_COLOURS.get(group[0]["kind"], (255, 128, 0))
        rect = [x0 * w, y0 * h, max(x0 * w, x1 * w - 1), max(y0 * h, y1 * h - 1)]
        if group[0]["kind"] == "proposal":  # up to hundreds: thin and unlabelled (the legend names them)
            draw.rectangle(rect, outline=colour, width=1)
            continue
        draw.rectangle(rect, outline=colour, width=2)
        label = " ".join(_tag(p["kind"], p["rotation"], p["flip"], x1 - x0) for p in group)
        corner = (round(rect[0]), round(rect[1]))
        draw.text((rect[0] + 2, rect[1] + 1 + 11 * labels_at[corner]), label, fill=colour, font=font,
                  stroke_width=1, stroke_fill=(0, 0, 0))
        labels_at[corner] += 1
    return thumb


def contact_sheet(thumbs: list[Image.Image], captions: list[str] | None = None, cols: int = 4,
                  side: int = THUMB) -> Image.Image:
    """Thumbnails on a grid of ``side`` cells, each captioned (its image id), with a colour legend
    of the patch kinds below."""
    rows = max(1, -(-len(thumbs) // cols))
    width, height = side + PAD, side + CAPTION + PAD
    sheet = Image.new("RGB", (cols * width + PAD, rows * height + PAD + 18), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for i, (t, caption) in enumerate(zip(thumbs, captions or [""] * len(thumbs))):
        x, y = PAD + (i % cols) * width, PAD + (i // cols) * height
        sheet.paste(t, (x, y))
        draw.text((x, y + side + 1), caption, fill=(230, 230, 230))
    x = PAD
    for kind, colour in KIND_COLOURS.items():
        draw.rectangle([x, sheet.height - 14, x + 10, sheet.height - 4], fill=colour)
        draw.text((x + 14, sheet.height - 16), kind, fill=colour)
        x += 14 + 7 * len(kind) + 12
    return sheet


def pick_images(manifest: pa.Table, n: int) -> list[dict]:
    """``n`` manifest rows, taken in turn from the query, reference and train splits."""
    by_split: dict[str, list[dict]] = defaultdict(list)
    for row in sorted(manifest.select(["image_id", "path", "split"]).to_pylist(), key=lambda r: r["image_id"]):
        by_split[row["split"]].append(row)
    order = [by_split[s] for s in ("query", "reference", "train") if by_split.get(s)]
    picked = []
    while len(picked) < n and any(order):
        for rows in order:
            if rows and len(picked) < n:
                picked.append(rows.pop(0))
    return picked


def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _table_html(patches: list[dict]) -> str:
    cols = ["patch_id", "kind", "x0", "y0", "x1", "y1", "rotation", "flip", "source_score"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(p[c])}</td>" for c in cols) + "</tr>" for p in patches)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_preview(manifest: pa.Table, patches: Mapping[str, pa.Table], n: int,
                  out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``preview.png`` (contact sheet) and ``preview.html`` for ``n`` images to ``out_dir``;
    ``patches`` maps a split to its patch table (an id may be in several splits)."""
    picked = pick_images(manifest, n)
    by_image: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for split, table in patches.items():
        ids = pa.array([r["image_id"] for r in picked if r["split"] == split], pa.string())
        for r in sorted(table.filter(pc.is_in(table.column("image_id"), value_set=ids)).to_pylist(),
                        key=lambda r: r["patch_id"]):
            by_image[(split, r["image_id"])].append(r)
    thumbs, captions, sections = [], [], []
    for r in picked:
        try:
            img = load_rgb(r["path"], max_side=THUMB)  # boxes are fractions: a JPEG decodes at 1/2-1/8 size
        except ImageDecodeError as e:
            sections.append(f"<h3>{html.escape(r['image_id'])}</h3><p>cannot decode: {html.escape(str(e))}</p>")
            continue
        rows = by_image[(r["split"], r["image_id"])]
        thumb = draw_patches(img, rows)
        thumbs.append(thumb)
        captions.append(f"{r['image_id']} ({r['split']})")
        sections.append(f"<h3>{html.escape(r['image_id'])} ({r['split']}, {len(rows)} patches)"
                        f"</h3><img src='{_data_uri(thumb)}'>{_table_html(rows)}")
    out = Path(out_dir)
    png, page = out / "preview.png", out / "preview.html"
    with atomic_output(png) as f:
        contact_sheet(thumbs, captions).save(f, format="PNG")
    write_text(page, "<!doctype html><html><head><meta charset='utf-8'><title>copydet patch preview</title>"
                    "<style>body{font-family:sans-serif;background:#222;color:#eee}table{border-collapse:collapse;"
                    "font-size:12px}td,th{border:1px solid #555;padding:2px 6px}</style></head><body>"
                    f"<h1>copydet patch preview</h1><img src='{png.name}'>" + "".join(sections) + "</body></html>")
    return png, page
