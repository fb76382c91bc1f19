"""The report's HTML: self-contained (inline CSS), images linked by path relative to the page."""
from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ensemble.report.analysis import Scored

CSS = """body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}td:first-child{text-align:left}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ccc;padding:6px;width:340px;font-size:12px}
.card img{max-width:160px;max-height:160px;vertical-align:top}.missing{display:inline-block;width:160px}"""
METRIC_COLUMNS = [("micro_ap", "μAP"), ("recall_at_p90", "R@P90"), ("threshold_at_p90", "threshold@P90"),
                  ("recall_at_1", "R@1"), ("recall_at_10", "R@10"), ("n_predictions", "predictions"),
                  ("n_positives", "GT pairs")]


@dataclass
class Card:
    """One gallery entry: a (query, reference) pair, its two thumbnails (``<img>`` HTML) and scores."""

    query_id: str
    reference_id: str
    query_img: str
    reference_img: str
    scores: Mapping[str, float]


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: float | int | None) -> str:
    if v is None:
        return "–"
    return str(v) if isinstance(v, int) else f"{v:.4f}"


def metrics_table(scored: Sequence[Scored]) -> str:
    head = "".join(f"<th>{_e(label)}</th>" for _, label in METRIC_COLUMNS)
    rows = []
    for s in scored:
        summary = s.metrics.summary()
        cells = "".join(f'<td class="{key}">{_fmt(summary[key])}</td>' for key, _ in METRIC_COLUMNS)
        rows.append(f'<tr data-name="{_e(s.name)}"><td>{_e(s.name)}</td>{cells}</tr>')
    return f"<table class=\"metrics\"><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"


def family_table(recall: Mapping[str, Mapping[str, tuple[float, int]]]) -> str:
    names = list(dict.fromkeys(n for f in recall for n in recall[f]))
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    rows = []
    for fam, by_name in recall.items():
        n = next(iter(by_name.values()))[1]
        cells = "".join(f"<td>{_fmt(by_name[name][0]) if name in by_name else '–'}</td>" for name in names)
        rows.append(f"<tr><td>{_e(fam)}</td><td>{n}</td>{cells}</tr>")
    return f"<table class=\"families\"><tr><th>family</th><th>GT pairs</th>{head}</tr>{''.join(rows)}</table>"


def calibration_table(rows: Sequence[tuple[float, int, float]]) -> str:
    """copies.csv's q_value against the ground truth: estimated and true precision at each cut."""
    body = "".join(f"<tr><td>{cut:.4g}</td><td>{n}</td><td>{_fmt(1 - cut)}</td><td>{_fmt(p)}</td></tr>"
                   for cut, n, p in rows)
    return ("<table class=\"calibration\"><tr><th>q_value at most</th><th>pairs</th><th>estimated precision</th>"
            f"<th>true precision</th></tr>{body}</table>")


def paragraph(text: str) -> str:
    return f"<p>{_e(text)}</p>"


def image(src: str | None, alt: str) -> str:
    """An ``<img>`` for a path relative to the page (``/``-separated), or a placeholder without one."""
    if src is None:
        return f'<span class="missing">({_e(alt)}: no image)</span>'
    return f'<img src="{_e(src.replace(os.sep, "/"))}" alt="{_e(alt)}">'


def gallery(cards: Sequence[Card]) -> str:
    if not cards:
        return "<p>none</p>"
    out = []
    for c in cards:
        scores = ", ".join(f"{_e(n)} {v:.3f}" for n, v in c.scores.items()) or "no member scored this pair"
        out.append(f'<div class="card">{c.query_img} {c.reference_img}'
                   f"<br><b>{_e(c.query_id)}</b> → <b>{_e(c.reference_id)}</b><br>{scores}</div>")
    return f"<div class=\"gallery\">{''.join(out)}</div>"


def render(title: str, notes: Sequence[str], sections: Sequence[tuple[str, str]]) -> str:
    """The whole page; ``sections`` are ``(heading, html body)`` pairs in order."""
    body = "".join(f"<h2>{_e(h)}</h2>{b}" for h, b in sections)
    note = "".join(paragraph(n) for n in notes)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>{note}{body}</body></html>\n")
