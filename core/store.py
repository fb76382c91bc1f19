"""Parquet I/O for the stage contracts of ../shared/DESIGN.md.

Every table a stage writes goes through :func:`write_table`: it writes to a temporary
name next to the target and renames it when complete, so a file that exists is a
finished shard and a crashed writer never leaves a half file behind. Paths may be local
paths or URIs that pyarrow's filesystems understand (``s3://``, ``gs://``, ``file://``).
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.contracts import features_schema


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI, and the path inside it."""
    path = str(path)
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def absolute(path: str) -> str:
    """A local ``path`` against the current folder (``~`` expanded), a URI as it is: Ray's workers run
    in their own folders, on a cluster on other machines, where a relative path names another place."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts for local paths and URIs alike."""
    base = str(base)
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def exists(path: str | os.PathLike) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str | os.PathLike) -> None:
    fs, p = filesystem(path)
    fs.create_dir(p, recursive=True)


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a folder and everything in it (nothing if it does not exist)."""
    if exists(path):
        fs, p = filesystem(path)
        fs.delete_dir(p)


def remove_file(path: str | os.PathLike) -> None:
    """Delete a file (nothing if it does not exist)."""
    if exists(path):
        fs, p = filesystem(path)
        fs.delete_file(p)


def temp_name(name: str) -> str:
    """The hidden name a file or folder is written under before it is renamed to ``name``."""
    return f".{name}.{uuid.uuid4().hex[:8]}.tmp"


TEMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # what temp_name makes


def remove_temps(folder: str, owned_by: str = ".lock") -> list[str]:
    """Delete the temp files and folders that killed writers left under local ``folder`` (a
    writer that dies by SIGKILL cannot clean up); sub-folders holding their own ``owned_by`` file
    belong to another writer and are left alone. Call it only while no writer of ``folder`` runs."""
    removed = []
    for root, dirs, files in os.walk(folder):
        if root != folder and owned_by in files:
            dirs.clear()
            continue
        for name in [n for n in dirs if TEMP.match(n)]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            dirs.remove(name)
            removed.append(os.path.join(root, name))
        for name in filter(TEMP.match, files):
            with suppress(FileNotFoundError):
                os.remove(os.path.join(root, name))
            removed.append(os.path.join(root, name))
    return removed


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary stream to ``path`` that appears there only when the block completes:
    written under a hidden temp name in the same folder, then renamed."""
    fs, p = filesystem(path)
    folder = os.path.dirname(p)
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/{temp_name(os.path.basename(p))}"
    try:
        with fs.open_output_stream(tmp) as f:
            yield f
        fs.move(tmp, p)
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A local folder to fill that appears at ``path`` only when the block completes (renamed
    from a hidden temp sibling); ``path`` must not exist yet. On error nothing is left behind."""
    final = Path(path)
    if final.exists():
        raise FileExistsError(f"{final}: already exists")
    tmp = final.with_name(temp_name(final.name))
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_table(table: pa.Table, path: str | os.PathLike) -> str:
    """Write ``table`` to ``path`` as Parquet, atomically."""
    with atomic_output(path) as f:
        pq.write_table(table, f)
    return str(path)


def concat_tables(files: Iterable[str | os.PathLike], path: str | os.PathLike, columns: list[str] | None = None) -> int:
    """Write the rows of Parquet ``files`` (``columns`` of them) to one file, atomically, one input
    in memory at a time; returns the rows written. The inputs must share a schema."""
    rows, writer = 0, None
    with atomic_output(path) as f:
        for file in files:
            table = read_table(file, columns=columns)
            writer = writer or pq.ParquetWriter(f, table.schema)
            writer.write_table(table)
            rows += table.num_rows
        if writer is None:
            raise ValueError(f"{path}: no input files to concatenate")
        writer.close()
    return rows


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically."""
    with atomic_output(path) as f:
        f.write(data)
    return str(path)


def write_text(path: str | os.PathLike, text: str) -> str:
    """Write a text file (JSON, YAML, HTML) atomically."""
    return write_bytes(path, text.encode())


def copy_file(src: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Copy a local file to ``dest`` atomically."""
    with open(src, "rb") as f, atomic_output(dest) as out:
        shutil.copyfileobj(f, out, 1 << 20)
    return str(dest)


def link_file(src: str | os.PathLike, dest: str | os.PathLike) -> str:
    """``dest`` as a hard link to the local file ``src``, which is never rewritten (a finished
    shard); an atomic copy across file systems."""
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        copy_file(src, dest)
    return str(dest)


def read_text(path: str | os.PathLike) -> str:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def read_table(path: str | os.PathLike, columns: list[str] | None = None,
               where: pc.Expression | None = None) -> pa.Table:
    """Read one Parquet file or a folder of shards (hidden temp files are ignored); with ``where``,
    only the rows it keeps (filtered batch by batch: the whole table is never in memory)."""
    fs, p = filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: no such table (has the previous stage run?)")
    return pq.read_table(p, filesystem=fs, columns=columns, filters=where)


def read_shards(files: Sequence[str], columns: list[str] | None = None,
                where: pc.Expression | None = None) -> pa.Table:
    """Several shard files of one folder (e.g. one split's) as one table, read in parallel; ``where``
    as in :func:`read_table`."""
    fs, _ = filesystem(files[0])
    return pq.read_table([filesystem(f)[1] for f in files], filesystem=fs, columns=columns, filters=where)


def version(path: str | os.PathLike) -> tuple[int, int]:
    """(modified time in ns, bytes) of a file: a cache keyed on it sees a rewritten file as new."""
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: no such file")
    return info.mtime_ns or 0, info.size or 0


def num_rows(path: str | os.PathLike) -> int:
    """Rows of one Parquet file, from its footer (no data is read)."""
    fs, p = filesystem(path)
    with fs.open_input_file(p) as f:
        return pq.ParquetFile(f).metadata.num_rows


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the files under ``folder`` (0 if it does not exist)."""
    fs, p = filesystem(folder)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return 0
    return sum(i.size or 0 for i in fs.get_file_info(pafs.FileSelector(p, recursive=True)))


def list_shards(folder: str | os.PathLike, prefix: str = "") -> list[str]:
    """Finished shard files in ``folder`` whose names start with ``prefix`` (sorted); temp files are
    skipped."""
    fs, p = filesystem(folder)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    names = sorted(i.base_name for i in infos if i.base_name.endswith(".parquet")
                   and i.base_name.startswith(prefix) and not i.base_name.startswith("."))
    return [join(folder, n) for n in names]


def chunks(n: int, size: int) -> Iterator[tuple[int, int, int]]:
    """Yield ``(shard_index, start, stop)`` covering ``range(n)`` in blocks of ``size``."""
    for i, start in enumerate(range(0, n, size)):
        yield i, start, min(start + size, n)


def embeddings_to_arrow(emb: np.ndarray, dtype: str = "float32") -> pa.FixedSizeListArray:
    """Pack an ``(n, d)`` array as ``fixed_size_list<float>[d]``."""
    emb = np.ascontiguousarray(emb, dtype=np.float16 if dtype == "float16" else np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


def embeddings_from_arrow(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Unpack a ``fixed_size_list`` column to a float32 ``(n, d)`` array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    d = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)


def features_table(image_ids: Iterable[str], patch_ids: Iterable[int], model: str, scale: int,
                   emb: np.ndarray, dtype: str = "float32") -> pa.Table:
    image_ids, patch_ids = list(image_ids), list(patch_ids)
    n = len(image_ids)
    return pa.Table.from_arrays([
        pa.array(image_ids, pa.string()), pa.array(patch_ids, pa.int32()),
        pa.array([model] * n, pa.string()), pa.array([scale] * n, pa.int16()),
        embeddings_to_arrow(emb, dtype),
    ], schema=features_schema(emb.shape[1], dtype))
