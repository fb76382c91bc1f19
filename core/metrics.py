"""ISC21 matching-track metrics (μAP, Recall@P90, R@1, R@10), prediction CSV I/O, PR plot.

The definitions follow facebookresearch/isc2021 ``isc/metrics.py``: predictions are ranked
by decreasing score with ties broken pessimistically (false before true), recall divides by
the number of ground-truth pairs, so a ground-truth pair that was never predicted lowers
recall. Everything is vectorised with numpy so a million predictions score in about a second.
"""
from __future__ import annotations

import csv
import io
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from core.contracts import PREDICTIONS_SCHEMA
from core.store import atomic_output

log = logging.getLogger(__name__)

WRITE_ROWS = 65536  # predictions turned into CSV lines at a time (DISC21's are 10M rows)
_NOT_FOUND = np.iinfo(np.int64).max  # rank of a ground-truth pair that was not predicted


@dataclass
class Metrics:
    """Scores of one prediction set; ``n_positives`` is the number of ground-truth pairs."""

    micro_ap: float
    recall_at_p90: float  # 0.0 when precision never reaches 0.9
    threshold_at_p90: float | None  # None when precision never reaches 0.9
    recall_at_1: float
    recall_at_10: float
    n_predictions: int
    n_positives: int
    precisions: np.ndarray  # PR curve, ordered by decreasing score
    recalls: np.ndarray
    thresholds: np.ndarray

    def summary(self) -> dict[str, float | int | None]:
        """The scalar fields as plain Python values (JSON-ready)."""
        out: dict[str, float | int | None] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, np.ndarray):
                out[f.name] = None if v is None else int(v) if isinstance(v, (int, np.integer)) else float(v)
        return out


def precision_recall(y_true: np.ndarray, scores: np.ndarray,
                     n_positives: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precisions, recalls and thresholds by decreasing score (false first among equal scores)."""
    order = np.lexsort((y_true, -scores))  # primary: score desc; ties: False before True
    y, t = y_true[order], scores[order]
    ntp = np.cumsum(y)
    return ntp / np.arange(1, len(y) + 1), ntp / n_positives, t


def average_precision(recalls: np.ndarray, precisions: np.ndarray) -> float:
    """μAP = sum_i (r_i - r_{i-1}) * p_i with r_0 = 0; recalls must be non-decreasing."""
    return float((np.diff(recalls, prepend=0.0) * precisions).sum())


def _pair_codes(gt: Sequence[tuple[str, str]], query_ids: np.ndarray,
                reference_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer codes for queries of the predictions and int64 keys of GT / predicted pairs."""
    gq = np.array([g[0] for g in gt], dtype=object)
    gr = np.array([g[1] for g in gt], dtype=object)
    q_codes, _ = pd.factorize(np.concatenate([gq, query_ids]))
    r_codes, r_uniq = pd.factorize(np.concatenate([gr, reference_ids]))
    keys = q_codes.astype(np.int64) * max(len(r_uniq), 1) + r_codes
    n = len(gt)
    return q_codes[n:], keys[:n], keys[n:]


def _check_duplicates(pred_keys: np.ndarray, query_ids: np.ndarray, reference_ids: np.ndarray) -> None:
    uniq, first, counts = np.unique(pred_keys, return_index=True, return_counts=True)
    if len(uniq) != len(pred_keys):
        i = first[np.argmax(counts > 1)]
        raise ValueError(f"predictions contain duplicates: {int((counts > 1).sum())} (query, reference) "
                         f"pairs appear more than once, e.g. ({query_ids[i]!r}, {reference_ids[i]!r})")


def _ranks_in_query(q_codes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per prediction: #(predictions of its query with score >= its score) - 1."""
    order = np.lexsort((-scores, q_codes))
    q, s = q_codes[order], scores[order]
    new_group = np.r_[True, q[1:] != q[:-1]]
    new_run = new_group | np.r_[True, s[1:] != s[:-1]]
    group_start = np.flatnonzero(new_group)[np.cumsum(new_group) - 1]
    run_last = np.r_[np.flatnonzero(new_run)[1:] - 1, len(q) - 1][np.cumsum(new_run) - 1]
    ranks = np.empty(len(q), dtype=np.int64)
    ranks[order] = run_last - group_start
    return ranks


def evaluate(gt: Sequence[tuple[str, str]], query_ids: Sequence[str], reference_ids: Sequence[str],
             scores: Sequence[float] | np.ndarray) -> Metrics:
    """Score predictions ``(query_ids[i], reference_ids[i], scores[i])`` against GT pairs."""
    if len(gt) == 0:
        raise ValueError("ground truth is empty: recall is undefined")
    qids = np.asarray(query_ids, dtype=object)
    rids = np.asarray(reference_ids, dtype=object)
    s = np.asarray(scores, dtype=np.float64)
    if not len(qids) == len(rids) == len(s):
        raise ValueError(f"predictions: {len(qids)} query ids, {len(rids)} reference ids, {len(s)} scores")
    if not np.isfinite(s).all():
        raise ValueError("predictions: scores contain NaN or infinite values")
    q_codes, gt_keys, pred_keys = _pair_codes(gt, qids, rids)
    _check_duplicates(pred_keys, qids, rids)

    y_true = np.isin(pred_keys, gt_keys)
    p, r, t = precision_recall(y_true, s, len(gt))
    valid = p >= 0.9
    best = int(np.argmax(np.where(valid, r, -1.0))) if valid.any() else None

    # rank of each GT pair among its query's predictions; pairs never predicted are not found
    at = pd.Index(pred_keys).get_indexer(gt_keys)  # pred_keys are unique (checked above)
    ranks = np.full(len(gt), _NOT_FOUND, dtype=np.int64)
    ranks[at >= 0] = _ranks_in_query(q_codes, s)[at[at >= 0]]

    return Metrics(
        micro_ap=average_precision(r, p),
        recall_at_p90=0.0 if best is None else float(r[best]),
        threshold_at_p90=None if best is None else float(t[best]),
        recall_at_1=float((ranks == 0).sum() / len(gt)),
        recall_at_10=float((ranks < 10).sum() / len(gt)),
        n_predictions=len(s), n_positives=len(gt),
        precisions=p, recalls=r, thresholds=t,
    )


def as_written(scores: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Scores as a predictions CSV holds them: float32 ones by their shortest text, which
    :func:`write_predictions` writes and :func:`read_predictions` reads back as float64. The order
    is float32's; a threshold taken from a table then admits the same rows in its CSV."""
    if scores.type == pa.float32():
        scores = pc.cast(pc.cast(scores, pa.string()), pa.float64())
    return scores.to_numpy()


def written(score: float) -> float:
    """One score as a predictions CSV holds it (:func:`as_written` of it as a float32; numpy's
    shortest text, ~1 us where an Arrow array takes ~20): a threshold given so compares with the
    file's scores as copydet's float32 comparisons do."""
    return float(str(np.float32(score)))


def at_threshold(m: Metrics, threshold: float) -> dict[str, float | int | None]:
    """Precision and recall of the predictions scoring at or above ``threshold`` (the is-copy
    decisions of ``fuse.threshold``); precision is None when no prediction reaches it."""
    at = written(threshold)  # float32 scores: a configured 0.7 admits a stored 0.7
    n = int(np.searchsorted(-m.thresholds, -at, side="right"))  # thresholds run high to low
    return {"threshold": float(threshold), "copies_at_threshold": n,
            "precision_at_threshold": float(m.precisions[n - 1]) if n else None,
            "recall_at_threshold": float(m.recalls[n - 1]) if n else 0.0}


def evaluate_table(gt: Sequence[tuple[str, str]], preds: pa.Table) -> Metrics:
    """:func:`evaluate` of a ``query_id, reference_id, score`` table (scores :func:`as_written`)."""
    return evaluate(gt, preds.column("query_id").to_numpy(zero_copy_only=False),
                    preds.column("reference_id").to_numpy(zero_copy_only=False), as_written(preds.column("score")))


def _header_left_out(path: str | os.PathLike, columns: list[str]) -> int:
    """How many columns the first row has when it is data, not a header (it names none of
    ``columns``: ISC21's files may leave the header out); 0 when it is a header."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = next(csv.reader(f), [])
    except (UnicodeDecodeError, csv.Error):
        return 0  # the CSV reader names what is wrong
    return 0 if not first or set(first) & set(columns) else len(first)


def _read_csv(path: str | os.PathLike, columns: list[str], types: dict[str, pa.DataType],
              optional: Sequence[str] = ()) -> pa.Table:
    """Standard CSV: a value with a comma, quote or line break is quoted (as :func:`write_predictions`
    does). The header line is optional; without one the columns are taken in ``columns``' order.
    ``optional`` columns follow them where the file has them."""
    n = _header_left_out(path, columns)
    if 0 < n < len(columns):
        raise ValueError(f"{path}: no header line, and {n} column(s) where {','.join(columns)} are expected")
    names = [*columns, *(f"extra{i}" for i in range(n - len(columns)))] if n else None
    try:
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=names),
                               parse_options=pacsv.ParseOptions(newlines_in_values=True),
                               convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False))
    except pa.ArrowInvalid as e:
        raise ValueError(f"{path}: not a valid CSV with header {','.join(columns)}: {e}") from e
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {table.column_names} "
                         f"(expected a header line {','.join(columns)})")
    for name in (c for c in columns if types[c] == pa.string()):
        _warn_spaced(path, name, table.column(name))
    return table.select([*columns, *(c for c in optional if c in table.column_names)])


def _warn_spaced(path: str | os.PathLike, name: str, ids: pa.ChunkedArray) -> None:
    """Ids are matched as written: ``Q1, R1`` (a space after the comma) names the reference `` R1``,
    which matches no image. Said once per column, with the first such id."""
    spaced = pc.not_equal(ids, pc.utf8_trim_whitespace(ids))
    if pc.any(spaced).as_py():
        first = ids[pc.index(spaced, True).as_py()].as_py()
        log.warning(f"{path}: {pc.sum(spaced).as_py()} {name} value(s) have spaces around them (e.g. {first!r}); "
                    "ids are matched as written: write the CSV without spaces after the commas")


def read_ground_truth(path: str | os.PathLike) -> list[tuple[str, str]]:
    """GT pairs from a CSV ``query_id,reference_id`` (header optional); rows with no reference are skipped.

    A pair listed twice would count twice in recall: it is refused, naming the pairs."""
    table = _read_csv(path, ["query_id", "reference_id"],
                      {"query_id": pa.string(), "reference_id": pa.string()})
    q, r = table.column("query_id").to_pylist(), table.column("reference_id").to_pylist()
    pairs = [(a, b) for a, b in zip(q, r) if b]
    repeated = sorted(p for p, n in Counter(pairs).items() if n > 1)
    if repeated:
        raise ValueError(f"{path}: {len(repeated)} (query_id, reference_id) pair(s) listed more than once: "
                         f"{', '.join(map(repr, repeated[:10]))}{' ...' if len(repeated) > 10 else ''}")
    return pairs


def read_predictions(path: str | os.PathLike, extra: Sequence[str] = ()) -> pa.Table:
    """An ISC21 prediction CSV (``query_id,reference_id,score``) with its scores as written (float64:
    as float32, ``20.000002`` and ``20.000001`` would tie, and ties rank the false pair first), and
    the numeric ``extra`` columns :func:`write_predictions` adds (e.g. ``q_value``) where it has them."""
    table = _read_csv(path, PREDICTIONS_SCHEMA.names, {"query_id": pa.string(), "reference_id": pa.string(),
                                                       "score": pa.float64(), **{c: pa.float64() for c in extra}},
                      extra)
    check_predictions(table, str(path))
    return table


def check_predictions(table: pa.Table, where: str) -> None:
    """Refuse, naming ``where`` and the first bad line, scores that are empty or not finite and
    (query, reference) pairs given twice: either would make every metric of the file wrong."""
    score = table.column("score")
    bad = pc.fill_null(pc.invert(pc.is_finite(score)), True)
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        value = "is empty or NaN" if score[i].as_py() is None else score[i].as_py()
        raise ValueError(f"{where}: line {i + 2} ({table['query_id'][i]}, {table['reference_id'][i]}): score {value}; "
                         "scores must be finite numbers")
    pairs = table.select(["query_id", "reference_id"])
    counts = pairs.group_by(pairs.column_names).aggregate([([], "count_all")])
    twice = counts.filter(pc.greater(counts["count_all"], 1))
    if twice.num_rows:
        raise ValueError(f"{where}: {twice.num_rows} (query, reference) pair(s) appear more than once, e.g. "
                         f"({twice['query_id'][0]}, {twice['reference_id'][0]})")


def write_predictions(tables: pa.Table | Iterable[pa.Table], path: str | os.PathLike, extra: Sequence[str] = ()) -> str:
    """Write ``query_id,reference_id,score`` (the ISC21 CSV) atomically: temp name, then rename;
    ``extra`` numeric columns follow (4 significant digits; empty where null), which ISC21 readers ignore.
    ``tables``: one table, or several written one after another (read one at a time, e.g. shards).

    Ids are written bare unless they hold a comma, quote or line break; those are quoted as
    standard CSV (RFC 4180), which :func:`read_predictions` reads back to the same ids."""
    with atomic_output(path) as f, io.TextIOWrapper(f, encoding="utf-8", newline="") as text:
        out = csv.writer(text, lineterminator="\n")  # quotes only the values that need it
        out.writerow([*PREDICTIONS_SCHEMA.names, *extra])
        for table in [tables] if isinstance(tables, pa.Table) else tables:
            for start in range(0, table.num_rows, WRITE_ROWS):  # Python objects for a slice at a time
                out.writerows(_csv_rows(table.slice(start, WRITE_ROWS), extra))
    return str(path)


def _csv_rows(table: pa.Table, extra: Sequence[str]) -> Iterator[tuple]:
    ids = table.select(PREDICTIONS_SCHEMA.names).cast(PREDICTIONS_SCHEMA)
    scores = pc.cast(ids.column("score"), pa.string())  # arrow's shortest float32 text, as its CSV writer
    more = [["" if v is None else f"{v:.4g}" for v in table.column(c).to_pylist()] for c in extra]
    return zip(ids.column("query_id").to_pylist(), ids.column("reference_id").to_pylist(), scores.to_pylist(), *more)


def plot_pr(curves: Mapping[str, Metrics], path: str | os.PathLike) -> str:
    """Write a PNG with one precision-recall curve per name (μAP in the legend) and the P=0.9 line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, m in curves.items():
        ax.plot(m.recalls, m.precisions, label=f"{name} (μAP {m.micro_ap:.3f})")
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=1, label="P = 0.9")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title="precision-recall")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")  # a weak model's curve runs along the lower left
    with atomic_output(path) as f:
        fig.savefig(f, format="png")
    return str(path)
