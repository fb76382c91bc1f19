"""Build ``bench/sample/``: a tiny ISC21-layout copy-detection set from CC-BY-2.0 flower photos.

A fresh clone has no benchmark data, so the default pipeline run uses this sample. Only the
TensorFlow ``flower_photos`` images (CC-BY-2.0, redistributable with credit) are used, taken
from a local miniDISC build (``images_meta.csv`` says where each photo comes from).

    .venv/bin/python bench/make_sample.py --source /work/shared/bench/minidisc-dev --out bench/sample

Output: ``train/`` (T0001..), ``references/`` (R0001..), ``queries/`` (Q0001..),
``ground_truth.csv`` (positives only), ``queries_meta.csv`` (transforms, for analysis only)
and ``README.md`` with a credit for every file. Same source and seed -> identical bytes.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.augment import EDITS, SCREENSHOT_TEMPLATES, emoji_names

FLOWER_SOURCE = "github:Oldpel/flower_photos"
FLOWER_LICENSE = "CC-BY-2.0"
N_TRAIN, N_REFERENCES, N_NEGATIVES, N_OVERLAYS, N_POSITIVES = 16, 24, 12, 4, 12
MAX_SIDE, QUALITY = 256, 88
MAX_BYTES = 2_000_000
FONTS = ("NotoSans-Regular.ttf", "NotoSerif-Regular.ttf", "NotoSansMono-Regular.ttf")
MEME_FONT = "NotoSans-Regular.ttf"
EMOJI_GROUPS = ("smileys", "animals_and_nature", "food_and_drink", "objects")
MEME_TEXTS = ("when the flowers bloom", "spring mood", "me on monday", "nature is healing", "petal power")
# At most one of these per query: each one changes the whole layout of the image.
LAYOUT_FAMILIES = {"meme_format", "overlay_onto_screenshot", "overlay_unrelated"}


@dataclass(frozen=True)
class Photo:
    """One flower photo of the source benchmark."""

    image_id: str  # id in the source benchmark (T00007, R00123)
    path: Path
    origin: str  # path in the flower_photos mirror, "@" commit

    @property
    def file_name(self) -> str:
        return self.origin.split("@")[0].rsplit("/", 1)[-1]

    @property
    def flickr_id(self) -> str:
        return self.file_name.split("_")[0]

    @property
    def category(self) -> str:
        return self.origin.split("@")[0].split("/")[-2]


@dataclass
class Context:
    """What transforms may draw from besides the rng: unrelated photos and emoji names."""

    overlays: list[tuple[str, Image.Image]]  # (flickr id, image)
    emojis: list[str]  # "group/name.png", sorted


def r3(x: float) -> float:
    return round(float(x), 3)


# Each family: (stage, fn(image, rng, ctx) -> (image, params)). Stages run in order:
# geometry (1) -> pixel (2) -> overlay (3) -> layout (4). ``params`` is what queries_meta.csv
# records: for most families exactly the keyword parameters of the shared edit it applies.
Draw = Callable[[Image.Image, np.random.Generator, Context], tuple[Image.Image, dict]]
Family = tuple[int, Draw]


def _edit(name: str, img: Image.Image, p: dict, **unrecorded: Any) -> tuple[Image.Image, dict]:
    """Apply edit ``name`` with the recorded params ``p`` (plus ``unrecorded`` ones); returns (image, p)."""
    return EDITS[name](img, **p, **unrecorded), p


def _crop(img: Image.Image, rng: np.random.Generator, ctx: Context) -> tuple[Image.Image, dict]:
    keep_w, keep_h = rng.uniform(0.55, 0.85, 2)
    x1, y1 = r3(rng.uniform(0, 1 - keep_w)), r3(rng.uniform(0, 1 - keep_h))
    return _edit("crop", img, {"x1": x1, "y1": y1, "x2": r3(x1 + keep_w), "y2": r3(y1 + keep_h)})


def _rotate(img: Image.Image, rng: np.random.Generator, ctx: Context) -> tuple[Image.Image, dict]:
    return _edit("rotate", img, {"degrees": r3(rng.choice([-1, 1]) * rng.uniform(5, 25))})


def _perspective(img: Image.Image, rng: np.random.Generator, ctx: Context) -> tuple[Image.Image, dict]:
    return _edit("perspective_transform", img, {"sigma": r3(rng.uniform(8, 20)), "seed": int(rng.integers(1 << 16))})


def _flip(img: Image.Image, rng: np.random.Generator, ctx: Context) -> tuple[Image.Image, dict]:
    return _edit("hflip", img, {})


def _blur(img: Image.Image, rng: np.random.Generator, ctx: Context) -> tuple[Image.Image, dict]:
    return _edit("blur", img, {"radius": r3(rng.uniform(1.0, 2.5))})


def _brightness(img: Image.Image, rng: np.random.Generator, ctx: Context) -> tuple[Image.Image, dict]:
    return _edit("brightness", img, {"factor": r3(rng.choice([rng.uniform(0.5, 0.75), rng.uniform(1.3, 1.7)]))})


def _grayscale(img: Image.Image, rng: np.random.Generator, ctx: Context) -> tuple[Image.Image, dict]:
    return _edit("grayscale", img, {})


def _pixelization(img: Image.Image, rng: np.random.Generator, ctx: Context) -> tuple[Image.Image, dict]:
    return _edit("pixelization", img, {"ratio": r3(rng.uniform(0.25, 0.5))})


def _jpeg(img: Image.Image, rng: np.random.Generator, ctx: Context) -> tuple[Image.Image, dict]:
    return _edit("encoding_quality", img, {"quality": int(rng.integers(12, 35))})


def _overlay_text(img: Image.Image, rng: np.random.Generator, ctx: Context) -> tuple[Image.Image, dict]:
    font = FONTS[rng.integers(len(FONTS))]
    return _edit("overlay_text", img, {
        "text": [int(i) for i in rng.integers(1, 90, rng.integers(4, 9))], "font": font,
        "font_size": r3(rng.uniform(0.1, 0.18)), "opacity": r3(rng.uniform(0.7, 1.0)),
        "color": [int(c) for c in rng.integers(0, 256, 3)],
        "x_pos": r3(rng.uniform(0, 0.4)), "y_pos": r3(rng.uniform(0.1, 0.8))})


def _overlay_emoji(img: Image.Image, rng: np.random.Generator, ctx: Context) -> tuple[Image.Image, dict]:
    return _edit("overlay_emoji", img, {
        "emoji": ctx.emojis[rng.integers(len(ctx.emojis))], "emoji_size": r3(rng.uniform(0.2, 0.4)),
        "opacity": r3(rng.uniform(0.8, 1.0)), "x_pos": r3(rng.uniform(0, 0.6)), "y_pos": r3(rng.uniform(0, 0.6))})


def _overlay_unrelated(img: Image.Image, rng: np.random.Generator, ctx: Context) -> tuple[Image.Image, dict]:
    flickr_id, overlay = ctx.overlays[rng.integers(len(ctx.overlays))]
    p = {"flickr_id": flickr_id, "overlay_size": r3(rng.uniform(0.35, 0.55)),
         "x_pos": r3(rng.uniform(0, 0.5)), "y_pos": r3(rng.uniform(0, 0.5))}
    out = EDITS["overlay_image"](img, overlay=overlay, overlay_size=p["overlay_size"], x_pos=p["x_pos"],
                                 y_pos=p["y_pos"], opacity=1.0, max_visible_opacity=1.0)
    return out, p


def _meme(img: Image.Image, rng: np.random.Generator, ctx: Context) -> tuple[Image.Image, dict]:
    return _edit("meme_format", img, {"text": MEME_TEXTS[rng.integers(len(MEME_TEXTS))],
                                      "caption_height": int(img.height * rng.uniform(0.25, 0.4)) + 12},
                 font=MEME_FONT)


def _screenshot(img: Image.Image, rng: np.random.Generator, ctx: Context) -> tuple[Image.Image, dict]:
    return _edit("overlay_onto_screenshot", img, {"template": SCREENSHOT_TEMPLATES[rng.integers(2)],
                                                  "crop_src_to_fit": bool(rng.integers(2))})


FAMILIES: dict[str, Family] = {
    "crop": (1, _crop), "rotate": (1, _rotate), "perspective": (1, _perspective), "flip": (1, _flip),
    "blur": (2, _blur), "brightness": (2, _brightness), "grayscale": (2, _grayscale),
    "pixelization": (2, _pixelization), "jpeg": (2, _jpeg),
    "overlay_text": (3, _overlay_text), "overlay_emoji": (3, _overlay_emoji),
    "overlay_unrelated": (4, _overlay_unrelated), "meme_format": (4, _meme),
    "overlay_onto_screenshot": (4, _screenshot),
}


def flower_photos(source: Path) -> list[Photo]:
    """The CC-BY-2.0 flower photos of a miniDISC build, by benchmark id."""
    folders = {"train": "train", "reference": "references"}
    with open(source / "images_meta.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f)
                if r["source"] == FLOWER_SOURCE and FLOWER_LICENSE in r["license"] and r["role"] in folders]
    if not rows:
        raise SystemExit(f"{source / 'images_meta.csv'}: no {FLOWER_SOURCE} ({FLOWER_LICENSE}) rows")
    photos = [Photo(r["image_id"], source / folders[r["role"]] / f"{r['image_id']}.jpg", r["origin"])
              for r in sorted(rows, key=lambda r: r["image_id"])]
    return list({p.flickr_id: p for p in photos}.values())  # one copy of each Flickr photo


def shrink(img: Image.Image) -> Image.Image:
    """RGB, longest side at most MAX_SIDE."""
    img = img.convert("RGB")
    scale = MAX_SIDE / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    return img


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    shrink(img).save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def draw_families(deck: list[str], n: int) -> list[str]:
    """Take ``n`` families off the front of ``deck`` (at most one layout family), in stage order."""
    chosen: list[str] = []
    for name in list(deck):
        if len(chosen) == n:
            break
        if name in chosen or (name in LAYOUT_FAMILIES and LAYOUT_FAMILIES & set(chosen)):
            continue
        chosen.append(name)
        deck.remove(name)
    return sorted(chosen, key=lambda name: FAMILIES[name][0])


def build(source: Path, out: Path, seed: int) -> dict[str, bytes]:
    """All output files of the sample as ``{relative path: bytes}``."""
    rng = np.random.default_rng(seed)
    photos = flower_photos(source)
    wanted = N_TRAIN + N_REFERENCES + N_NEGATIVES + N_OVERLAYS
    if len(photos) < wanted:
        raise SystemExit(f"{source}: {len(photos)} flower photos, need {wanted}")
    picked = [photos[i] for i in rng.permutation(len(photos))[:wanted]]
    train, refs = picked[:N_TRAIN], picked[N_TRAIN:N_TRAIN + N_REFERENCES]
    negatives = picked[N_TRAIN + N_REFERENCES:N_TRAIN + N_REFERENCES + N_NEGATIVES]
    overlays = picked[N_TRAIN + N_REFERENCES + N_NEGATIVES:]

    files: dict[str, bytes] = {}
    credits: list[tuple[str, Photo, str]] = []
    ref_images: dict[str, Image.Image] = {}
    for prefix, folder, role, group in (("T", "train", "train", train), ("R", "references", "reference", refs)):
        for i, photo in enumerate(group, 1):
            name = f"{prefix}{i:04d}"
            data = jpeg_bytes(Image.open(photo.path))
            files[f"{folder}/{name}.jpg"] = data
            credits.append((f"{folder}/{name}.jpg", photo, role))
            if role == "reference":  # positives are edited from the file as shipped
                ref_images[name] = Image.open(io.BytesIO(data)).convert("RGB")

    ctx = Context(overlays=[(p.flickr_id, shrink(Image.open(p.path))) for p in overlays],
                  emojis=list(emoji_names(EMOJI_GROUPS)))
    copied = sorted(rng.choice(N_REFERENCES, N_POSITIVES, replace=False))
    sources = [(f"R{i + 1:04d}", refs[i]) for i in copied] + [(None, p) for p in negatives]
    order = rng.permutation(len(sources))  # positives and negatives interleaved by chance
    deck = [name for _ in range(4) for name in rng.permutation(sorted(FAMILIES))]
    meta, truth = [], []
    for q, k in enumerate(order, 1):
        ref_id, photo = sources[k]
        qid = f"Q{q:04d}"
        img = ref_images[ref_id] if ref_id else shrink(Image.open(photo.path))
        names, params = draw_families(deck, int(rng.integers(1, 3))), []
        for name in names:
            img, p = FAMILIES[name][1](img, rng, ctx)
            params.append([name, p])
        files[f"queries/{qid}.jpg"] = jpeg_bytes(img)
        use = f"copy of {ref_id}" if ref_id else "negative query"
        credits.append((f"queries/{qid}.jpg", photo, use))
        for name, p in params:
            if name == "overlay_unrelated":
                credits.append((f"queries/{qid}.jpg", next(o for o in overlays if o.flickr_id == p["flickr_id"]),
                                "pasted over the query (overlay_unrelated)"))
        meta.append({"query_id": qid, "positive": int(ref_id is not None), "reference_id": ref_id or "",
                     "transforms": ";".join(names), "params": json.dumps(params, sort_keys=True),
                     "flickr_id": photo.flickr_id})
        if ref_id:
            truth.append({"query_id": qid, "reference_id": ref_id})

    files["ground_truth.csv"] = to_csv(truth, ["query_id", "reference_id"])
    files["queries_meta.csv"] = to_csv(meta, list(meta[0]))
    files["README.md"] = readme(source, out, seed, files, meta, credits).encode()
    return files


def to_csv(rows: list[dict], columns: list[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def readme(source: Path, out: Path, seed: int, files: dict[str, bytes], meta: list[dict],
           credits: list[tuple[str, Photo, str]]) -> str:
    """README.md: what the sample is, how it was made, and a credit line for every photo used."""
    counts = Counter(path.split("/")[0] for path in files if path.endswith(".jpg"))
    families = Counter(t for m in meta for t in m["transforms"].split(";"))
    positives = sum(m["positive"] for m in meta)
    lines = [
        "# copydet sample set",
        "",
        "A tiny image copy-detection set in the ISC21 / DISC21 layout, bundled so that a fresh clone can",
        "run the whole pipeline (`copydet run configs/smoke.yaml`) without downloading anything.",
        "It is far too small to measure quality; use it to check that everything runs.",
        "",
        "| part | count |", "|---|---|",
        f"| train/ (unlabeled, disjoint from references and queries) | {counts['train']} |",
        f"| references/ | {counts['references']} ({positives} of them copied into queries) |",
        f"| queries/ | {counts['queries']} ({positives} positive: edited copies of a reference; "
        f"{len(meta) - positives} negative: edited photos absent from references and train) |",
        "",
        f"Ids `T0001`.., `R0001`.., `Q0001`..; max side {MAX_SIDE} px, JPEG quality {QUALITY}.",
        "`ground_truth.csv`: `query_id,reference_id` for the positive queries only.",
        "`queries_meta.csv`: per query the positive flag, the reference, the AugLy 1.0.0 transforms",
        "applied in order (`transforms`, `;`-separated) and their parameters (`params`, JSON). It holds",
        "the answers: use it for analysis (e.g. `copydet report --meta`), never as method input.",
        "",
        "## How it was made",
        "",
        "```bash",
        f".venv/bin/python bench/make_sample.py --source {source} --out {out.as_posix()} --seed {seed}",
        "```",
        "",
        f"Picks {N_TRAIN} train, {N_REFERENCES} reference and {N_NEGATIVES} negative-query photos, plus {N_OVERLAYS}",
        "photos used only as pasted overlays, from the TensorFlow flower_photos images of a local miniDISC",
        "build (`images_meta.csv` rows with that source), with a seeded permutation. Each query gets 1 or",
        "2 transform families (at most one of meme_format / overlay_onto_screenshot / overlay_unrelated).",
        "Running the script again gives byte-identical files.",
        "",
        "| family | queries |", "|---|---|",
        *[f"| {name} | {n} |" for name, n in sorted(families.items())],
        "",
        "## Credits",
        "",
        f"All photos are from the TensorFlow `flower_photos` dataset (mirror `{FLOWER_SOURCE}`), licensed",
        "under the Creative Commons Attribution 2.0 Generic licence (CC-BY-2.0); photographers as listed",
        "in the TensorFlow flower_photos LICENSE.txt, where each photo is found by its Flickr photo id",
        "below. The photos were resized, recompressed and, for queries, edited as described above.",
        "",
        "Overlays drawn on queries come from AugLy 1.0.0's bundled assets: Twemoji graphics",
        "(Copyright 2020 Twitter, Inc and other contributors, CC-BY-4.0), Noto fonts (SIL Open Font",
        "License 1.1) and AugLy's screenshot templates (AugLy, MIT licence).",
        "",
        "| file | Flickr photo id | flower_photos file | use | licence |", "|---|---|---|---|---|",
        *[f"| {path} | {p.flickr_id} | {p.category}/{p.file_name} | {use} | {FLOWER_LICENSE} |"
          for path, p, use in credits],
        "",
    ]
    return "\n".join(lines)


def write(out: Path, files: dict[str, bytes]) -> int:
    """Replace the sample in ``out`` by ``files``; returns the total size in bytes."""
    for folder in ("train", "references", "queries"):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for old in (out / folder).glob("*.jpg"):
            old.unlink()
    for rel, data in files.items():
        (out / rel).write_bytes(data)
    return sum(len(d) for d in files.values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=Path("/work/shared/bench/minidisc-dev"),
                    help="miniDISC build with images_meta.csv, train/ and references/")
    ap.add_argument("--out", type=Path, default=Path("bench/sample"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    files = build(args.source, args.out, args.seed)
    total = sum(len(d) for d in files.values())
    if total > MAX_BYTES:
        raise SystemExit(f"sample would be {total} bytes, over the {MAX_BYTES} byte budget")
    write(args.out, files)
    counts = Counter(rel.split("/")[0] for rel in files if rel.endswith(".jpg"))
    print(f"{args.out}: {dict(counts)}, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
