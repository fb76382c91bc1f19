"""``copydet run`` and one command per pipeline stage.

Command bodies import :mod:`jobs.pipeline` (torch, the stage runners) when they run, so the
command line starts in about a second (``bench/cli_start.py``).
"""
from __future__ import annotations

import argparse
import logging
import os

from core.metrics import plot_pr, read_ground_truth, read_predictions
from core.store import exists, read_table
from core.yamlconf import parse_overrides, text_override
from jobs.commands.base import arg, command, config_from_args
from jobs.commands.report import META_HELP, unread_note, write_report
from jobs.completeness import require_pinned
from jobs.config import ConfigError, PipelineConfig
from jobs.inputs import check_pair_ids, run_ground_truth
from jobs.layout import RunDir
from jobs.lock import locked
from jobs.stages.evaluate import evaluate_run_files, format_metrics
from jobs.threshold import threshold_of

log = logging.getLogger(__name__)

ROOT_NOTE = "; replaces the config's data.root, unless --set data.root= is given too"
FOLDER_ARGS = (
    arg("--train", help="folder of unlabeled training images" + ROOT_NOTE),
    arg("--references", help="folder of reference images" + ROOT_NOTE),
    arg("--queries", help="folder of query images" + ROOT_NOTE),
    arg("--ground-truth", help="ISC21 ground-truth CSV (query_id,reference_id)"),
)
REUSE_ARG = arg("--reuse", metavar="RUN", help="start from run folder RUN's reference and train shards (manifest, "
                "patches, features) where RUN made them from the same files with the same settings: new queries "
                "against the same references do not describe them again")


def config_with_folders(args: argparse.Namespace, sets: list[str] | None = None) -> PipelineConfig:
    """The command's config with the folder options (:data:`FOLDER_ARGS`) as ``data.*`` settings
    after ``sets`` (default: ``--set``). A folder given replaces the config's ``data.root``; a
    ``data.root`` in ``sets`` stays and gives the splits not given (minidisc-hard's queries with
    minidisc-dev's references and train)."""
    sets = list((args.set or []) if sets is None else sets)
    folders = {key: value for key in ("train", "references", "queries", "ground_truth")
               if isinstance(value := getattr(args, key, None), str) and value}  # `plan` takes counts too
    sets += [text_override(f"data.{key}", value) for key, value in folders.items()]
    root_given = any(key == "data.root" for key, _ in parse_overrides(sets))
    if folders.keys() - {"ground_truth"} and not root_given:
        sets.append("data.root=null")
    return config_from_args(args, sets)


@command("run", "run the whole pipeline (manifest, patch, extract, reduce, search, fuse, verify, evaluate) "
         "on Ray",
         *FOLDER_ARGS,
         arg("--report", action=argparse.BooleanOptionalAction, default=True,
             help="then write RUN_DIR/report.html when there is a ground truth (default: on)"),
         arg("--meta", help=f"report: {META_HELP} (default: queries_meta.csv in data.root, if there)"),
         REUSE_ARG)
def run(args: argparse.Namespace) -> int:
    cfg = config_with_folders(args)  # a bad config is refused before the pipeline's imports take seconds
    from jobs.pipeline import run_pipeline

    run = RunDir(cfg.output)
    with locked(run):  # the report's lines and the last line go to RUN/copydet.log too
        metrics = run_pipeline(cfg, address=args.address, reuse=args.reuse)
        unread = unread_note(run)
        if metrics is None:
            log.info(f"done: {cfg.output} (no ground truth: predictions only, {run.predictions})"
                     + (f" | {unread}" if unread else ""))
            return 0
        report = None
        if args.report:
            report = write_report(cfg.output, cfg.data.ground_truth_path(), args.meta or root_meta(cfg))
        line = format_metrics(metrics, threshold_of(cfg, run))
        log.info(f"done: {line}" + (f" | {unread}" if unread else "") + (f" | report: {report}" if report else ""))
    return 0


def root_meta(cfg: PipelineConfig) -> str | None:
    """``queries_meta.csv`` beside an ISC21-layout root's ground truth (the bundled sample's and
    minidisc's): the report's recall per transform family. Analysis only, never fed to a method."""
    meta = os.path.join(cfg.data.root, "queries_meta.csv") if cfg.data.root else None
    if meta and os.path.isfile(meta):
        log.info(f"report: transform families from {meta}")
        return meta
    return None


def stage_command(name: str, help: str, *extra: tuple) -> None:
    """Register `copydet NAME` as a run of that one stage."""
    @command(name, help, *extra)
    def fn(args: argparse.Namespace) -> None:
        cfg = config_with_folders(args)  # refused, if bad, before the imports below
        if name != "manifest":
            require_pinned(RunDir(cfg.output))  # so is a run folder with no manifest
        from jobs.pipeline import run_stages

        run_stages(cfg, [name], address=args.address, reuse=getattr(args, "reuse", None))


stage_command("manifest", "image folders -> manifest.parquet (+ errors.parquet)", *FOLDER_ARGS, REUSE_ARG)
stage_command("extract", "patches x (model, scale) -> sharded feature Parquet (Ray Data actors)")
stage_command("reduce", "PCA/whitening, descriptor stretching or member concatenation fit on train/ (reduce.*)")
stage_command("search", "faiss kNN of query patches against reference patches -> candidates")
stage_command("fuse", "candidates -> predictions.csv (max over patches and models, top k per query)")
stage_command("verify", "keypoint-verify each query's best candidates and re-score (verify.enabled)")


@command("evaluate", "score predictions against a ground truth: μAP, R@P90, R@1, R@10, PR curve",
         arg("--predictions", help="predictions CSV (default: the run's predictions.csv)"),
         arg("--ground-truth", help="ground-truth CSV (default: the config's)"),
         arg("--plot", help="PR-curve PNG to write"),
         arg("--threshold", type=float, help="also the precision and recall of the pairs scoring at or above this"),
         address=None)
def evaluate(args: argparse.Namespace) -> int:
    """A predictions file against a ground truth (given, or a named config's), or the run's own
    predictions (with ``--ground-truth``, against that file, checked against the run's images)."""
    if args.predictions:
        gt = args.ground_truth or _named_ground_truth(args)
        log.info(f"evaluate: {args.predictions} against {gt}")
        run = RunDir(args.out) if args.out else None  # its images: every id is checked against them
        preds = read_predictions(args.predictions)
        if run and exists(run.inputs):
            inputs = read_table(run.inputs)
            pairs = run_ground_truth(gt, run, inputs)
            check_pair_ids(zip(preds["query_id"].to_pylist(), preds["reference_id"].to_pylist()), inputs,
                           f"{args.predictions}: {{n}} id(s) of the predictions")
        else:
            pairs = read_ground_truth(gt)
        m = evaluate_run_files(preds, pairs, pr_png=args.plot)
        print(format_metrics(m, args.threshold, "--threshold"))
        if m.n_predictions and m.micro_ap == 0:  # not one true pair among them
            log.warning(f"evaluate: no predicted pair is a ground-truth pair of {gt}: are these predictions of "
                        "its queries and references?")
        return 0
    given = [text_override("data.ground_truth", args.ground_truth)] if args.ground_truth else []
    cfg = config_from_args(args, [*(args.set or []), *given])
    if cfg.data.ground_truth_path() is None:
        raise ConfigError("no ground truth to score against: the config names none (data.ground_truth, or "
                          "ground_truth.csv under data.root); pass --ground-truth CSV")
    require_pinned(RunDir(cfg.output))  # a run folder with no manifest is refused before the import below
    from jobs.pipeline import evaluate_run

    m = evaluate_run(cfg)
    if args.threshold is not None:
        print(format_metrics(m, args.threshold, "--threshold"))
    if args.plot:
        plot_pr({cfg.name: m}, args.plot)
    return 0


def _named_ground_truth(args: argparse.Namespace) -> str:
    """The ground truth of the CONFIG (or ``--out`` run folder) the user named: never the default
    config's, which would score any predictions against the bundled sample."""
    if args.config is None and not (args.out and exists(RunDir(args.out).config)):
        raise ValueError("evaluate --predictions: give --ground-truth (or the CONFIG whose ground truth to use)")
    gt = config_from_args(args).data.ground_truth_path()
    if gt is None:
        raise ValueError("evaluate --predictions: give --ground-truth (the config names none)")
    return gt
