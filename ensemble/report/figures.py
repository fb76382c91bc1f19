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
                    path: str, title: str = "ensemble") -> str:
    """Overlaid histograms of copy / non-copy prediction scores with the P90 threshold line."""
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    both = np.concatenate([positives, negatives])
    bins = np.linspace(both.min(), both.max(), 31) if len(both) and both.min() < both.max() else 30
    ax.hist(negatives, bins=bins, alpha=0.6, color="tab:red", label=f"non-copies ({len(negatives)})")
    ax.hist(positives, bins=bins, alpha=0.6, color="tab:green", label=f"copies ({len(positives)})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"P90 threshold {threshold:.3f}")
    ax.set(xlabel="score", ylabel="predictions", title=f"score distribution: {title}")
    ax.legend()
    return _save(fig, path)


def family_bars(recall: Mapping[str, Mapping[str, tuple[float, int]]], path: str) -> str:
    """Grouped bars: R@1 per transform family (x) for each member / the ensemble (colour)."""
    families = list(recall)
    names = list(dict.fromkeys(n for f in families for n in recall[f]))
    fig = _figure((max(6.0, 0.6 * len(families) * max(len(names), 1) + 2), 4))
    ax = fig.add_subplot()
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(families))
    for i, name in enumerate(names):
        ax.bar(x + i * width, [recall[f].get(name, (0.0, 0))[0] for f in families], width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, [f"{f}\n({next(iter(recall[f].values()))[1]})" for f in families],
                  rotation=30, ha="right")
    ax.set(ylabel="R@1", ylim=(0, 1.05), title="recall@1 per transform family (#copies)")
    ax.legend(fontsize="small")
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
