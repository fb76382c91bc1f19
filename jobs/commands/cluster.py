"""``copydet submit | status | logs | stop | plan``: the pipeline as a Ray Job on a cluster."""
from __future__ import annotations

import argparse
import logging

from core.yamlconf import read_yaml
from jobs.commands.base import arg, command, config_path, count_or_folder, positive_int
from jobs.commands.stages import config_with_folders
from jobs.config import ConfigError
from jobs.stages import NAMES as STAGES
from jobs.submit import TRAIN_STAGES

log = logging.getLogger(__name__)

JOBS_ADDRESS = "Ray dashboard address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS or localhost)"
JOB_ARGS = (
    arg("job_id", metavar="JOB", help="job id printed by `copydet submit`"),
    arg("--address", help=JOBS_ADDRESS),
)


@command("submit", "submit the pipeline, one stage, or training (pretrain/finetune/train-verifier with a training "
         "config) to a Ray cluster as a Ray Job; prints the job id",
         arg("--stage", default="run", choices=["run", *STAGES, *TRAIN_STAGES],
             help="one stage instead of the whole run; pretrain / finetune / train-verifier take a training config"),
         arg("--follow", action="store_true", help="stream the job's logs until it ends"),
         arg("--reuse", metavar="RUN", help="the run starts from run folder RUN's reference and train shards "
             "(`copydet run --reuse`; an absolute path the cluster's nodes share)"),
         address=JOBS_ADDRESS)
def submit(args: argparse.Namespace) -> int:
    if args.stage in TRAIN_STAGES and not args.config:
        raise ConfigError(f"--stage {args.stage}: give the training config (e.g. configs/train/cluster.yaml)")
    config = args.config if args.stage in TRAIN_STAGES else config_path(args)  # a run folder's own, as stages do
    if config:
        read_yaml(config)  # a missing or broken file is refused before the imports below take seconds
    from jobs.submit import job_logs, job_status
    from jobs.submit import submit as submit_job

    job_id = submit_job(config, args.address, args.stage, list(args.set or []), args.out, warn=log.warning,
                        reuse=args.reuse)
    print(job_id, flush=True)
    if args.follow:
        job_logs(job_id, args.address, follow=True)
        status = job_status(job_id, args.address)
        log.info(status)
        return 0 if status.startswith("SUCCEEDED") else 1
    return 0


@command("status", "status of a submitted job", *JOB_ARGS, uses_config=False)
def status(args: argparse.Namespace) -> int:
    from jobs.submit import job_status
    s = job_status(args.job_id, args.address)
    print(s)
    return 1 if s.startswith("FAILED") else 0


@command("logs", "print a submitted job's logs", *JOB_ARGS,
         arg("--follow", action="store_true", help="stream until the job ends"), uses_config=False)
def logs(args: argparse.Namespace) -> None:
    from jobs.submit import job_logs
    job_logs(args.job_id, args.address, follow=args.follow)


@command("stop", "stop a submitted job", *JOB_ARGS, uses_config=False)
def stop(args: argparse.Namespace) -> None:
    from jobs.submit import stop_job
    log.info(f"{args.job_id}: {'stop requested' if stop_job(args.job_id, args.address) else 'already finished'}")


@command("plan", "patches, feature bytes, index memory and GPU-hours per stage for a config",
         arg("--images", type=positive_int, help="images per split (overrides counting the folders)"),
         arg("--references", type=count_or_folder, metavar="N|FOLDER",
             help="reference images: how many (DISC21: 1000000), or their folder, counted (as for `copydet run`)"),
         arg("--queries", type=count_or_folder, metavar="N|FOLDER",
             help="query images (DISC21: 50000), or their folder"),
         arg("--train", type=count_or_folder, metavar="N|FOLDER",
             help="train images (DISC21: 1000000), or their folder"),
         arg("--throughput", help="bench JSON with images_per_s per model key (default: measure here)"),
         arg("--gpus", type=positive_int, help="GPUs the cluster runs on in parallel (default: 8 with --throughput; "
             "1, this machine, when measured here)"),
         arg("--models-from", metavar="TRAIN_CONFIG",
             help="training config whose models are not registered yet (sized from their architecture)"),
         address=None)
def plan(args: argparse.Namespace) -> None:
    cfg = config_with_folders(args)  # a bad config is refused before the imports below take seconds
    from core.models.cards import RegistryError
    from jobs.plan import build_plan, format_plan, model_cards, split_counts, throughputs
    from jobs.preflight import detector_checks, resolved_each
    from pretrain.train.fanout import planned_cards
    from pretrain.train_config import load_train_config

    try:  # a detector is costed at its box budget; the patch stage needs it registered
        resolved_each(detector_checks(cfg))
    except RegistryError as e:
        log.warning(f"plan: {e}; the run stops at its start until then (planned at max_patches boxes)")
    given = {key: n for key in ("references", "queries", "train") if isinstance(n := getattr(args, key), int)}
    counts = split_counts(cfg, images=args.images, **given)
    cards = model_cards(cfg, planned_cards(load_train_config(args.models_from)) if args.models_from else {})
    dims = {name: int(card.dim) for name, card in cards.items()}
    print(format_plan(build_plan(cfg, counts, throughputs(cfg, cards, args.throughput),
                                 gpus=args.gpus or (8 if args.throughput else 1), dims=dims)))
