"""``copydet index add INDEX FOLDER``: the images of a folder not yet in the index, embedded and published.

Only the new images are embedded, a chunk at a time (``index.chunk_images``) with
:class:`patchers.embed.ImageEmbedder` (the extraction pieces, per image), in this process or on
``index.num_workers`` Ray actors, into a staging folder outside the writer's lock (takedowns
publish meanwhile) that a re-run of a stopped add goes on from; then the parent version plus their
shards is published, so an add's cost follows what is added.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
from tqdm import tqdm

from core.contracts import ERRORS_SCHEMA
from core.imageio import ImageDecodeError, ImageFile, file_list_hash, load_rgb, scan_images, sha256_file
from core.store import embeddings_from_arrow, read_table, write_table
from ensemble.index import versions
from ensemble.index.layout import IndexDir
from ensemble.reduce import load_pca
from jobs.config import PipelineConfig
from jobs.indexing import derive_keys, embedder_for, index_config
from jobs.inputs import check_unique_ids, some_of
from jobs.runtime import BAR_DELAY, WorkerFailed, on_workers

log = logging.getLogger(__name__)


class NothingAdded(ValueError):
    """No image of an ``index add`` could be added (all known, removed or unreadable)."""


def add_folder(root: str, folder: str, overrides: Sequence[str] = (),
               address: str | None = None) -> tuple[str, int, list[str]]:
    """Embed the images of ``folder`` not yet in the index and publish them; returns
    ``(version, images added, error lines)``: the version is the published one, unchanged, when
    every image is live already. Ids already live are skipped, ids removed since the last
    compaction are refused (their rows still sit in the shards), and so is an id two files give."""
    idx = IndexDir(root)
    parent, cfg = index_config(root, None, overrides)
    scan = scan_images(os.path.abspath(folder))  # the service opens them from its own folder
    check_unique_ids(scan, folder, "index add")
    files = [(f.image_id, f.path) for f in scan.files]
    ids = pa.array([i for i, _ in files], pa.string())  # the id map's rows of these only: it may hold millions
    known = versions.live_images(idx.path(parent), versions.read_manifest(idx.path(parent)), written=True, among=ids)
    live = {i: Indexed(*row) for i, *row in zip(*(known.column(c).to_pylist()
                                                  for c in ("image_id", "path", "sha256", "written_ns")))}
    removed = set(versions.removed_table(idx.path(parent)).column("image_id").to_pylist())
    failed = [{"path": p, "error": f"{p}: {reason}"} for p, reason in scan.rejected]
    again = sorted(i for i, _ in files if i in removed)
    if again:
        raise ValueError(f"{some_of(again)}: removed since the last compaction; run `copydet index compact {root}` "
                         "before adding them again")
    todo = [f for f in scan.files if f.image_id not in live]
    warn_skipped([(i, p) for i, p in files if i in live], live, folder)
    if not files:
        raise NothingAdded(f"{folder}: no image files to add ({len(failed)} other file(s))")
    if not todo:
        return parent, 0, [f["error"] for f in failed]
    try:  # embedded without the writer's lock (takedowns publish meanwhile), where a re-run goes on from
        with idx.staging(staging_name(idx, parent, todo, cfg.index.chunk_images)) as staging:
            worker = (os.path.abspath(root), parent, list(overrides), str(staging.resolve()))
            try:
                rows, staged = embed_new(todo, cfg, worker, staging, failed, address)
            except WorkerFailed as e:
                raise RuntimeError(f"index add: a worker failed ({e}); the chunks embedded are kept in {staging}, "
                                   "so a re-run of this add goes on from them") from None
            if not rows.num_rows:
                raise NothingAdded(f"{folder}: none of {len(todo)} new image(s) decodes: "
                                   f"{[f['error'] for f in failed][:3]}")
            with idx.publish(parent, accept=lambda now: versions.takedowns_only(idx, parent, now)) as (name, out):
                base = idx.current()  # the parent, or the takedowns published on it since
                versions.add(idx, base, out, name, staged, rows, cfg.search.index_spec(), cfg.search.shard_size,
                             cfg.index.merge_fanout)
                if failed:
                    write_table(pa.Table.from_pylist(failed, schema=ERRORS_SCHEMA), out / versions.ERRORS)
    except NothingAdded:
        if len(todo) < len(files):  # the rest is in already (a retry): the unreadable ones are named, not fatal
            return parent, 0, [f["error"] for f in failed]
        raise
    return name, rows.num_rows, [f["error"] for f in failed]


class Indexed(NamedTuple):
    """A live reference's file as the index recorded it."""

    path: str
    sha256: str
    written_ns: int


def changed_since(path: str, indexed: Indexed) -> bool:
    """Whether ``path`` holds another picture than ``indexed``. Only a file that may (another path,
    or the same one changed after the index recorded it: ctime, which edits and a file moved onto
    it set) is hashed: re-adding an unchanged indexed folder reads no bytes."""
    maybe = path != indexed.path or os.stat(path).st_ctime_ns > indexed.written_ns
    return maybe and sha256_file(path) != indexed.sha256


def warn_skipped(skipped: list[tuple[str, str]], live: dict[str, Indexed], folder: str) -> None:
    """Name the ``(id, path)`` already live, and warn of those whose file is another picture than
    the indexed one: an add never replaces a reference."""
    if not skipped:
        return
    log.info(f"index add: {len(skipped)} image(s) of {folder} are already in the index; skipped: "
             f"{some_of([i for i, _ in skipped])}")
    other = [i for i, p in skipped if changed_since(p, live[i])]
    if other:
        log.warning(f"index add: {len(other)} of them are other pictures than the indexed ones, which are kept: "
                    f"{some_of(other)}; to replace one, `copydet index remove` it, `compact`, then add it")


def staging_name(idx: IndexDir, version: str, todo: Sequence[ImageFile], chunk: int) -> str:
    """What an add's staged chunks are made from: the files (paths, sizes, mtimes), the chunk size,
    and the version's config, model cards, PCA and background files (by inode: the versions after
    it link them). A re-run of a killed or refused add finds them under this name."""
    folder = idx.path(version)
    made_from = [folder / "config.yaml", *folder.glob("cards/*"), *folder.glob("reduce/*"),
                 *folder.glob("keys/*/train.parquet")]
    stats = [(str(p.relative_to(folder)), p.stat()) for p in sorted(made_from)]
    return file_list_hash(todo, f"{chunk}\n" + "".join(f"{rel}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\n"
                                                    for rel, st in stats))[:32]


def embed_new(todo: Sequence[ImageFile], cfg: PipelineConfig, worker: tuple, staging: Path, failed: list[dict],
              address: str | None = None) -> tuple[pa.Table, dict[str, list[str]]]:
    """Decode and embed ``todo`` ``index.chunk_images`` at a time into ``staging`` on
    ``index.num_workers`` :class:`ChunkEmbedder` (built from ``worker``), or read back the chunks a
    stopped run of the same add left there; returns the id-map rows of the images that decoded and
    each search key's files, both in chunk order. The files that do not decode are appended to ``failed``."""
    step, unreadable = cfg.index.chunk_images, len(failed)  # the files that are not images, counted apart
    chunks = [(f"part-{start:08d}.parquet", todo[start:start + step]) for start in range(0, len(todo), step)]
    keys = cfg.search_keys()
    finished = {name: staged_chunk(staging, name, keys) for name, _ in chunks
                if (staging / "images" / name).exists()}  # before the command was stopped
    resources = {"num_cpus": cfg.index.num_cpus, "num_gpus": cfg.index.num_gpus}
    embedded = on_workers(ChunkEmbedder, worker, "embed", [c for c in chunks if c[0] not in finished],
                          cfg.index.num_workers, resources, cfg.ray, address, gpus_setting="index.num_gpus")
    again = sum(len(c) for n, c in chunks if n in finished)
    with tqdm(total=len(todo), initial=again, desc="index add", unit="image", delay=BAR_DELAY) as bar:
        for chunk in embedded:  # as they finish
            finished[chunk.name] = chunk
            bar.update(chunk.images.num_rows + len(chunk.failed))
    done = [finished[name] for name, _ in chunks]
    rows = pa.concat_tables([c.images for c in done])
    failed += [f for c in done for f in c.failed]
    staged = {key: [c.files[key] for c in done if key in c.files] for key in keys}
    resumed = f" ({again} read back from a stopped run's chunks)" if again else ""
    log.info(f"index add: {len(todo)} new images: {rows.num_rows} embedded, {len(failed) - unreadable} unreadable"
             f"{resumed}")
    return rows, staged


class Chunk(NamedTuple):
    """What :meth:`ChunkEmbedder.embed` made of one chunk: the id-map rows of its images that
    decoded, the files that did not, and its feature file per search key."""

    name: str
    images: pa.Table
    failed: list[dict]
    files: dict[str, str]


def staged_chunk(staging: Path, name: str, keys: Iterable[str]) -> Chunk:
    """A chunk :meth:`ChunkEmbedder.embed` finished before, read back."""
    images = read_table(staging / "images" / name).cast(versions.IMAGES_SCHEMA)
    files = {key: str(staging / "keys" / key / name) for key in keys} if images.num_rows else {}
    return Chunk(name, images, read_table(staging / "errors" / name).to_pylist(), files)


class ChunkEmbedder:
    """An index version's reference embedding (its models, views, PCA and stretch background), built
    once, that writes chunks into a staging folder."""

    def __init__(self, root: str, version: str, overrides: Sequence[str], staging: str) -> None:
        idx = IndexDir(root)
        _, self.cfg = index_config(root, version, overrides)
        meta = versions.read_manifest(idx.path(version))
        self.embedder = embedder_for(root, version, self.cfg, "reference", use_gpu=self.cfg.index.num_gpus > 0)
        self.pcas = {k: load_pca(idx.path(version) / m["pca"]) for k, m in meta["keys"].items() if m.get("pca")}
        self.train = stretch_background(idx, version, self.cfg)
        self.staging = Path(staging)

    def embed(self, name: str, chunk: Sequence[ImageFile]) -> Chunk:
        """Decode and embed one chunk into ``staging/keys/<key>/name``; its id-map rows, written last
        (``staging/images/name``), mark it done."""
        rows, failed, decoded = [], [], []
        for f in chunk:
            try:
                img = load_rgb(f.path, max_pixels=self.cfg.data.max_pixels)
            except ImageDecodeError as e:
                failed.append({"path": e.path, "error": str(e)})
                continue
            decoded.append((f.image_id, img))
            rows.append({"image_id": f.image_id, "path": f.path, "sha256": sha256_file(f.path),
                         "width": img.width, "height": img.height})
        embedded = derive_keys(self.cfg, self.embedder.embed(decoded, sources={f.image_id: f.path for f in chunk}),
                               self.pcas, self.train) if decoded else {}
        files = {key: write_table(table, self.staging / "keys" / key / name) for key, table in embedded.items()}
        write_table(pa.Table.from_pylist(failed, schema=ERRORS_SCHEMA), self.staging / "errors" / name)
        images = pa.Table.from_pylist(rows, schema=versions.IMAGES_SCHEMA)
        write_table(images, self.staging / "images" / name)
        return Chunk(name, images, failed, files)


def stretch_background(idx: IndexDir, version: str, cfg: PipelineConfig) -> dict:
    """Search key -> train descriptors that new references are stretched against (reduce.stretch)."""
    if not cfg.reduce.stretch:
        return {}
    folder = idx.path(version) / "keys"
    return {key: embeddings_from_arrow(read_table(folder / key / "train.parquet", columns=["embedding"])
                                       .column("embedding")) for key in cfg.search_keys()}
