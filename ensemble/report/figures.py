"""PNG figures and thumbnails of the run report (matplotlib's Agg canvas: no pyplot state)."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from core.imageio import ImageDecodeError, load_rgb
from core.store import atomic_output


def _save(fig: Figure, path: str) -> str:
    with atomic_output(path) as f:
        fig.savefig(f, format="png")
    return path


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def score_histogram(positives: np.ndarray, negatives: np.ndarray, threshold: float | None,
                    path: str, title: str = "ensemble", decision: tuple[str, float] | None = None) -> str:
    """Overlaid histograms of copy / non-copy prediction scores with the P90 threshold line and
    the run's is-copy threshold (``decision``: what set it, score)."""
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    both = np.concatenate([positives, negatives])
    bins = np.linspace(both.min(), both.max(), 31) if len(both) and both.min() < both.max() else 30
    ax.hist(negatives, bins=bins, alpha=0.6, color="tab:red", label=f"non-copies ({len(negatives)})")
    ax.hist(positives, bins=bins, alpha=0.6, color="tab:green", label=f"copies ({len(positives)})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"P90 threshold {threshold:.3f}")
    if decision is not None:
        ax.axvline(decision[1], color="tab:blue", linestyle=":", linewidth=2,
                   label=f"is-copy threshold {decision[1]:.3f}")
    ax.set(xlabel="score", ylabel="predictions", title=f"score distribution: {title}")
    ax.legend()
    return _save(fig, path)


def family_heatmap(recall: Mapping[str, Mapping[str, tuple[float, int]]], path: str) -> str:
    """Heat map of R@1, transform families (rows, worst of the last scorer first) x members /
    the ensemble (columns), every cell labelled; its size grows with the table, not with their product."""
    names = list(dict.fromkeys(n for f in recall for n in recall[f]))
    families = sorted(recall, key=lambda f: (recall[f].get(names[-1], (0.0, 0))[0], f))
    grid = np.array([[recall[f][n][0] if n in recall[f] else np.nan for n in names] for f in families])
    fig = _figure((2.4 + 0.95 * len(names), 1.2 + 0.28 * len(families)))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="black" if 0.25 < v < 0.85
                    else "white")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="left", fontsize=8)
    ax.set_yticks(range(len(families)), [f"{f} ({next(iter(recall[f].values()))[1]})" for f in families],
                  fontsize=8)
    ax.xaxis.tick_top()
    ax.set_title("recall@1 per transform family\n(#copies), worst first", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.6, label="R@1")
    return _save(fig, path)


def thumbnail(image_path: str | None, folder: str, image_id: str, side: int = 160) -> str | None:
    """A JPEG thumbnail in ``folder`` (name from a hash of the id); None if the image is unreadable."""
    if not image_path:
        return None
    out = os.path.join(folder, hashlib.sha1(image_id.encode()).hexdigest()[:16] + ".jpg")
    try:
        thumb = load_rgb(image_path, max_side=side)
    except ImageDecodeError:
        return None
    with atomic_output(out) as f:
        thumb.save(f, format="JPEG", quality=85)
    return out
