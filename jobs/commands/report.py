"""``copydet report RUN_DIR`` (report.html + PNGs of one finished run) and ``copydet compare``
(several runs' predictions side by side, overall and per transform family)."""
from __future__ import annotations

import argparse
import logging
import os
from functools import partial

import pyarrow as pa
import pyarrow.csv as pacsv

from core.metrics import read_predictions
from core.store import exists, read_table
from ensemble.report.analysis import Scored, family_recall, score
from jobs import environment
from jobs.commands.base import arg, command, positive_int
from jobs.completeness import require_candidates
from jobs.config import ConfigError, PipelineConfig, load_config
from jobs.inputs import recheck_inputs, run_ground_truth
from jobs.layout import RunDir, paths_of, shard_names
from jobs.lock import locked
from jobs.stages.fuse import require_final
from jobs.threshold import threshold_of

log = logging.getLogger(__name__)


def members(run: RunDir, cfg: PipelineConfig | None) -> dict[str, pa.Table]:
    """Candidates of every member: each ``candidates/<key>`` folder with finished shards, of the
    run's config ``cfg`` when it has one (not those a run with other models left there)."""
    root = os.path.join(run.root, "candidates")
    keys = sorted(k for k in os.listdir(root) if shard_names(run.candidates(k))) if os.path.isdir(root) else []
    return {k: read_table(run.candidates(k)) for k in keys if cfg is None or k in cfg.search_keys()}


def saved_config(run: RunDir) -> PipelineConfig | None:
    """The config the run saved (None: a folder without config.yaml, e.g. predictions copied in)."""
    return load_config(run.config) if os.path.isfile(run.config) else None


def final_predictions(run: RunDir, cfg: PipelineConfig | None, what: str) -> pa.Table:
    """``run``'s predictions.csv, refused when it holds another stage's scores than its config's
    (``cfg``) last (fuse run again after verify, or a run stopped in between: :func:`require_final`)
    or when a member's candidates are unfinished (a run restarted with other models, stopped before fuse)."""
    if cfg is not None:
        if exists(run.inputs):  # a run copydet made, not predictions copied in beside a config
            require_candidates(cfg, run, what)
        require_final(cfg, run)
    return read_predictions(run.predictions)


def ground_truth_path(run: RunDir, cfg: PipelineConfig | None, given: str | None) -> str:
    """``--ground-truth``, else the one named by the run's saved config ``cfg``."""
    if given:
        return given
    if cfg is None:
        raise ConfigError(f"{run.root}: no config.yaml to find the ground truth in; pass --ground-truth")
    path = cfg.data.ground_truth_path()
    if not path:
        raise ConfigError(f"{run.config}: data section names no ground truth; pass --ground-truth")
    return path


def read_families(path: str) -> dict[str, list[str]]:
    """``query_id -> transform families`` from a CSV with columns query_id and transforms (';'-separated)."""
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            include_columns=["query_id", "transforms"],
            column_types={"query_id": pa.string(), "transforms": pa.string()}))
    except (pa.ArrowInvalid, KeyError) as e:
        raise ValueError(f"{path}: expected a CSV with columns query_id,transforms: {e}") from e
    out: dict[str, list[str]] = {}
    for q, ts in zip(table.column("query_id").to_pylist(), table.column("transforms").to_pylist()):
        fams = out.setdefault(q, [])  # a query listed twice has the families of both rows
        fams += [t.strip() for t in (ts or "").split(";") if t.strip() and t.strip() not in fams]
    return out


def write_report(run_dir: str, ground_truth: str | None = None, meta: str | None = None, k: int = 10) -> str:
    """``RUN_DIR/report.html`` of a finished run (families from ``meta``); returns its path.

    Holds the run folder's lock: a run still writing there would mix old and new files into one page.
    """
    from ensemble.report.build import build_report  # matplotlib: loaded to draw, not with the command line

    run = RunDir(os.path.abspath(run_dir))
    if not os.path.isdir(run.root):
        raise FileNotFoundError(f"{run.root}: no such run folder")
    with locked(run, hint=""):  # a report of the finished run: only waiting helps
        recheck_inputs(run)  # its thumbnails are read from the images the scores were made from
        cfg = saved_config(run)
        gt_path = ground_truth_path(run, cfg, ground_truth)
        preds = final_predictions(run, cfg, "report") if os.path.isfile(run.predictions) else None
        if preds is None:
            log.warning(f"report: no {run.predictions}: the report shows the members only (run `copydet fuse`)")
        paths = partial(paths_of, run, required=False) if exists(run.manifest) else None
        return build_report(run.root, members(run, cfg), preds, run_ground_truth(gt_path, run), paths=paths,
                            families=read_families(meta) if meta else None, k=k,
                            title=f"copydet report: {os.path.basename(run.root)}",
                            notes=[f"ground truth: {gt_path}",
                                   *([f"no {run.predictions}: members only"] if preds is None else []),
                                   *filter(None, [unread_note(run), environment.summary(run)])],
                            threshold=decision(run, cfg), copies=read_copies(run) if preds is not None else None)


def read_copies(run: RunDir) -> pa.Table | None:
    """The run's copies.csv (with ``q_value`` when its threshold was estimated), if it has one."""
    return read_predictions(run.copies, ["q_value"]) if exists(run.copies) else None


def decision(run: RunDir, cfg: PipelineConfig | None) -> tuple[str, float] | None:
    """The run's is-copy threshold (what set it, the score) as its saved config ``cfg`` makes it, if any."""
    t = None if cfg is None else threshold_of(cfg, run)
    if t is None:
        return None
    return ("fuse.threshold, estimated from train/ decoys" if cfg.decoys() else "fuse.threshold"), t


def unread_note(run: RunDir) -> str | None:
    """``N input file(s) could not be read (RUN/errors.parquet)``, or None when every file read."""
    n = read_table(run.errors).num_rows if exists(run.errors) else 0
    return f"{n} input file(s) could not be read ({run.errors})" if n else None


META_HELP = "query metadata CSV with columns query_id,transforms (';'-separated families)"


@command("report", "write RUN_DIR/report.html: metrics per member and ensemble, PR curves, "
         "per-family recall, score histogram, false-positive / missed-copy gallery",
         arg("run_dir", nargs="?", help="run folder (local path)"),
         arg("--out", help="the run folder, as the other commands take it (instead of RUN_DIR)"),
         arg("--meta", help=META_HELP),
         arg("--ground-truth", help="ground-truth CSV (default: the one in RUN_DIR/config.yaml)"),
         arg("--k", type=positive_int, default=10, help="references per query kept for each member (default 10)"),
         uses_config=False)
def report(args: argparse.Namespace) -> None:
    if bool(args.run_dir) == bool(args.out):
        raise ValueError("give the run folder once, as RUN_DIR or --out")
    log.info(f"report: {write_report(args.run_dir or args.out, args.ground_truth, args.meta, args.k)}")


def run_labels(dirs: list[str]) -> list[str]:
    """Each run's shortest path tail that no other run shares (``runs/a/hard``, ``runs/b/hard``
    -> ``a/hard``, ``b/hard``): the table's columns and the per-family keys."""
    parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in dirs]
    for n in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise ValueError(f"compare: a run folder is given twice: {dirs}")


def comparison_table(scored: list[Scored], recall: dict[str, dict[str, tuple[float, int]]]) -> str:
    """Plain-text table: μAP, R@P90, R@1 per run, then R@1 per family (with its GT pair count), and
    the ground-truth pairs each run was scored on (runs of other data.limit differ)."""
    width = max(12, *(len(s.name) for s in scored)) + 2
    rows = [(label, [get(s.metrics) for s in scored]) for label, get in [
        ("μAP", lambda m: m.micro_ap), ("R@P90", lambda m: m.recall_at_p90),
        ("R@1", lambda m: m.recall_at_1), ("R@10", lambda m: m.recall_at_10)]]
    if recall:
        rows.append(("R@1 per family (GT pairs)", []))
        rows += [(f"  {fam} ({next(iter(per_run.values()))[1]})", [per_run[s.name][0] for s in scored])
                 for fam, per_run in recall.items()]
    label_width = max(len(label) for label, _ in rows) + 2
    lines = [" " * label_width + "".join(f"{s.name:>{width}}" for s in scored)]
    lines += [(f"{label:<{label_width}}" + "".join(f"{v:>{width}.4f}" for v in values)).rstrip()
              for label, values in rows]
    lines.append(f"{'GT pairs':<{label_width}}" + "".join(f"{s.metrics.n_positives:>{width},}" for s in scored))
    return "\n".join(lines)


@command("compare", "score several runs' predictions.csv, each against its ground truth, overall and per "
         "transform family, as one table",
         arg("run_dirs", nargs="+", help="run folders (local paths)"),
         arg("--meta", help=META_HELP),
         arg("--ground-truth", help="ground-truth CSV for every run (default: each run's config.yaml names its own)"),
         uses_config=False)
def compare(args: argparse.Namespace) -> None:
    runs = [RunDir(os.path.abspath(d)) for d in args.run_dirs]
    missing = [r.predictions for r in runs if not os.path.isfile(r.predictions)]
    if missing:
        raise FileNotFoundError(f"no predictions.csv in: {', '.join(missing)}")
    scored, truths = [], []
    for label, r in zip(run_labels(args.run_dirs), runs):
        cfg = saved_config(r)
        path = ground_truth_path(r, cfg, args.ground_truth)
        gt = run_ground_truth(path, r)  # that run's images, within its data.limit, as its own metrics
        log.info(f"compare: {label} against {path} ({len(gt)} pairs)")
        pred = final_predictions(r, cfg, "compare")
        scored.append(Scored(label, pred, pred, score(pred, gt)))
        truths.append(gt)
    first = set(truths[0])
    same = all(set(t) == first for t in truths[1:])
    if not same:
        log.warning("compare: the runs' ground truths differ (other files, or data.limit): each column is scored "
                    "against its own, and the per-family rows are left out")
    recall = family_recall(scored, truths[0], read_families(args.meta)) if args.meta and same else {}
    print(comparison_table(scored, recall))
