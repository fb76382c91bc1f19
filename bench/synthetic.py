"""Synthetic descriptors for the search benches: clustered, L2-normalised, with noisy copies."""
from __future__ import annotations

import numpy as np

from core.store import features_table, write_table


def descriptors(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors around ``n / 200`` cluster centres (photos of similar scenes)."""
    centres = rng.normal(size=(max(1, n // 200), d))
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def copies(x: np.ndarray, n: int, rng: np.random.Generator, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy unit copies of random rows of ``x`` and the rows they were made from."""
    source = rng.choice(len(x), n, replace=False)
    q = x[source] + noise * rng.normal(size=(n, x.shape[1])).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True), source


def write_references(x: np.ndarray, folder: str, rows_per_file: int = 50_000) -> list[str]:
    """``x`` as reference feature Parquet files (image ids ``R<row>``), as the extract stage writes them."""
    files = []
    for i, start in enumerate(range(0, len(x), rows_per_file)):
        block = x[start:start + rows_per_file]
        table = features_table([f"R{start + j}" for j in range(len(block))], [0] * len(block), "synthetic", 0, block)
        files.append(write_table(table, f"{folder}/reference-{i:05d}.parquet"))
    return files
