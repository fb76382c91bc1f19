"""Builds the run report (:func:`build_report`): the metrics, PR, per-family, score and gallery
sections, each figure written beside the HTML."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import pyarrow as pa

from core.metrics import at_threshold, plot_pr
from core.store import write_text
from ensemble.report import figures, page
from ensemble.report.analysis import (
    GT,
    Scored,
    false_positives,
    family_recall,
    missed_copies,
    pair_scores,
    positive_mask,
    q_calibration,
    score_members,
)

ASSETS = "report"  # folder of PNGs / thumbnails, relative to the HTML
SCORES = ("Each member row scores that model's own candidates (its best patch pair, its top k references a query); "
          "the ensemble row scores predictions.csv: the members fused and, when the run verifies, re-scored by "
          "verification. Scores are on different scales from row to row.")

SIDES = ("query", "reference")  # the manifest splits of a pair's two images
CALIBRATION = ("copies.csv's q_value is the decoys' estimate of the false share among the pairs scoring at least as "
               "high; with the ground truth, the precision those pairs actually reach:")


def build_report(out_dir: str, members: Mapping[str, pa.Table], predictions: pa.Table | None, gt: GT,
                 paths: Callable[[str, list[str]], Mapping[str, str]] | None = None,
                 families: Mapping[str, Sequence[str]] | None = None, k: int = 10, gallery_size: int = 8,
                 title: str = "copydet run report",
                 notes: Sequence[str] = (), threshold: tuple[str, float] | None = None,
                 copies: pa.Table | None = None) -> str:
    """Write ``out_dir/report.html`` and its figures; returns the HTML path.

    ``members`` maps a member name to its candidates table; ``predictions`` is the
    ensemble's ``(query_id, reference_id, score)`` table; ``paths(split, ids)`` gives the files
    of the gallery's ``ids`` of ``split`` (``query``, ``reference``: a query and a reference may
    share an id) that it knows, for the thumbnails; ``families`` maps query ids to their transform
    families; ``threshold`` is the run's is-copy decision, ``(what set it, score)``: its copies,
    precision and recall are shown; ``copies`` (copies.csv with its ``q_value``) gives the table of
    estimated against true precision.
    """
    if not members and predictions is None:
        raise ValueError(f"report for {out_dir}: no member candidates and no ensemble predictions")
    if not gt:
        raise ValueError(f"report for {out_dir}: the ground truth is empty")
    assets = os.path.join(out_dir, ASSETS)
    scored = score_members(members, predictions, gt, k)
    primary = scored[-1]  # the ensemble when there is one

    def img(path: str | None, alt: str) -> str:
        return page.image(None if path is None else os.path.relpath(path, out_dir), alt)

    pr = plot_pr({s.name: s.metrics for s in scored}, os.path.join(assets, "pr_curves.png"))
    decision = decision_paragraph(primary, threshold) if threshold and predictions is not None else ""
    if copies is not None and "q_value" in copies.column_names:
        decision += page.paragraph(CALIBRATION) + page.calibration_table(q_calibration(copies, gt))
    sections = [("Metrics", page.metrics_table(scored) + page.paragraph(SCORES) + decision),
                ("Precision-recall", img(pr, "PR curves"))]
    recall = family_recall(scored, gt, families) if families else {}
    if recall:
        png = figures.family_heatmap(recall, os.path.join(assets, "families.png"))
        sections.append(("Recall@1 per transform family", page.family_table(recall) + img(png, "R@1 per family")))
    pos = positive_mask(primary.predictions, gt)
    s = primary.predictions.column("score").to_numpy()
    png = figures.score_histogram(s[pos], s[~pos], primary.metrics.threshold_at_p90,
                                  os.path.join(assets, "scores.png"), primary.name, threshold)
    sections.append((f"Scores of {primary.name}", img(png, "score histogram")))
    sections += galleries(primary, scored, gt, paths, gallery_size, img, os.path.join(assets, "thumbs"))
    summary = f"{len(gt)} ground-truth pairs; members scored on their top {k} references per query."
    return write_text(os.path.join(out_dir, "report.html"), page.render(title, [*notes, summary], sections))


def decision_paragraph(primary: Scored, threshold: tuple[str, float]) -> str:
    """What the run's is-copy ``threshold`` (``(what set it, score)``) decides on ``primary``."""
    t = at_threshold(primary.metrics, threshold[1])
    p = "–" if t["precision_at_threshold"] is None else f"{t['precision_at_threshold']:.4f}"
    return page.paragraph(f"Is-copy threshold ({threshold[0]}) {threshold[1]:.4f}: "
                          f"{t['copies_at_threshold']} predictions at or above it (copies.csv), precision {p}, "
                          f"recall {t['recall_at_threshold']:.4f}. threshold@P90 is the one the ground truth "
                          "would pick.")


def galleries(primary: Scored, scored: Sequence[Scored], gt: GT,
              paths: Callable[[str, list[str]], Mapping[str, str]] | None, size: int,
              img: Callable[[str | None, str], str], thumbs: str) -> list[tuple[str, str]]:
    """The gallery sections of ``primary``'s worst false positives and missed copies, each pair's
    thumbnails written to ``thumbs`` and its score under every row of ``scored``."""
    missed = missed_copies(primary.predictions, gt, primary.metrics.threshold_at_p90)
    sections = []
    for heading, errors in [
        (f"Top false positives of {primary.name}", false_positives(primary.predictions, gt, size)),
        (f"Missed copies of {primary.name} (not predicted or below the P90 threshold; the worst "
         f"{min(size, len(missed))} of {len(missed)})", missed[:size]),
    ]:
        pairs = [(q, r) for q, r, _ in errors]
        scores = pair_scores(scored, pairs)
        files = [paths(split, list(ids)) if paths and ids else {} for split, ids in zip(SIDES, zip(*pairs))]
        cards = [page.Card(q, r, img(figures.thumbnail(files[0].get(q), thumbs, f"query/{q}"), q),
                           img(figures.thumbnail(files[1].get(r), thumbs, f"reference/{r}"), r),
                           scores[(q, r)])
                 for q, r in pairs]
        sections.append((heading, page.gallery(cards)))
    return sections
