"""``copydet tune CONFIG``: tune beta and fusion on a validation split, write a config ``copydet run`` uses.

The body imports the tuning code (torch, AugLy) when it runs, not with the command line."""
from __future__ import annotations

import argparse
import logging
import os

from core.yamlconf import with_output
from jobs.commands.base import arg, command, config_path
from jobs.config import ConfigError, load_config

log = logging.getLogger(__name__)

BETA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # the betas tried unless --beta-grid names others
MAX_MATCHED_PHOTOS = 1200  # cap of matched_sizes: a split big enough to tune on, small enough to run


def matched_sizes(train_photos: int, references: int, cap: int = MAX_MATCHED_PHOTOS) -> tuple[int, int]:
    """``(photos, background)`` for a split whose references : background ratio is the evaluated
    set's references : train ratio.

    Normalised scores subtract a query's best train similarity from its best reference one, so
    the score of a non-copy depends on how many references compete with how many background
    photos; a split with that ratio scores non-copies as the real run will, and a threshold
    calibrated on it carries over. Half of the held-out photos become references.
    """
    if train_photos < 3 or references < 1:
        raise ValueError(f"matched_sizes: need >= 3 train photos and >= 1 reference, got {train_photos}, {references}")
    ratio = references / train_photos
    photos = min(cap, int(train_photos * 2 * ratio / (2 * ratio + 1)))
    photos = max(2, min(photos, train_photos - 1))
    background = max(1, min(train_photos - photos, round(photos / (2 * ratio))))
    return photos, background


def beta_grid(text: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]`` (argparse type; betas must be >= 0)."""
    try:
        grid = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not grid or min(grid) < 0:
        raise argparse.ArgumentTypeError(f"need one or more betas >= 0, got {text!r}")
    return grid


@command("tune", "pick search.normalize.beta and fuse.thresholds/rule on a validation split (user-given, "
         "or synthetic copies of train photos), calibrate the is-copy fuse.threshold on it, and write a tuned config",
         arg("--validation-queries", help="folder of validation queries (with --validation-ground-truth)"),
         arg("--validation-ground-truth", help="CSV query_id,reference_id for the validation queries"),
         arg("--recipe", default="heavy", help="augmentation recipe for synthetic copies (default: heavy, "
             "which mixes the ISC21 edit families; severe adds thumbnails, padding and noise at full strength; "
             "heavy+severe: the copies take the two in turn, for choices such as scales that the two order apart)"),
         arg("--photos", type=int, help="train photos held out for a synthetic split (default: as many as keep "
             "the split's references : background ratio the config's references : train one, at most "
             f"{MAX_MATCHED_PHOTOS})"),
         arg("--background", type=int, help="train photos kept as the normalisation background (default: "
             "the matched number with the default --photos, else all the others)"),
         arg("--seed", type=int, default=0, help="seed of the synthetic split (default 0)"),
         arg("--beta-grid", type=beta_grid, default=list(BETA_GRID),
             help=f"comma-separated betas to try (default {','.join(f'{b:g}' for b in BETA_GRID)})"),
         arg("--write", help="tuned config to write (default: RUN_DIR/tuned.yaml)"))
def tune(args: argparse.Namespace) -> None:
    config = config_path(args)  # the tuned file is written from it
    if bool(args.validation_queries) != bool(args.validation_ground_truth):
        raise ConfigError("give both --validation-queries and --validation-ground-truth, or neither")
    overrides = with_output(args.set or [], args.out)
    cfg = load_config(config, overrides)  # a bad config is refused before the imports below take seconds
    from jobs.plan import count_images
    from jobs.tune import (
        format_subsets,
        format_table,
        format_threshold,
        provenance,
        tune_on_split,
        tuned_values,
        user_split,
        write_tuned_config,
    )
    from pretrain.synthetic import SplitSpec, make_synthetic_split

    run_dir = cfg.output
    if "://" in run_dir:
        raise ConfigError(f"the run folder must be a local path, got {run_dir}")
    if args.validation_queries:
        split = user_split(cfg, args.validation_queries, args.validation_ground_truth)
    else:
        train = cfg.data.folders().get("train")
        if train is None:
            raise ConfigError(f"{config}: no train folder to make a synthetic validation split from; "
                              "pass --validation-queries and --validation-ground-truth")
        photos, background = args.photos, args.background
        refs = cfg.data.folders().get("reference")
        if photos is None and refs is not None:
            photos, matched = matched_sizes(count_images(train), count_images(refs))  # counted, not listed
            background = matched if background is None else background
        if background == 0 and cfg.search.normalize.enabled:
            raise ConfigError("--background 0 leaves the split nothing to normalise against, but the "
                              "config normalises scores (search.normalize.enabled); keep some background photos")
        spec = SplitSpec(photos, args.recipe, args.seed, background)
        split = make_synthetic_split(train, os.path.join(run_dir, "tune", "data"), spec)
    result, threshold = tune_on_split(cfg, split, run_dir, args.beta_grid, args.address)
    print(format_table(result))
    if result.subsets:
        print(format_subsets(result))
    print(format_threshold(threshold) if threshold else "fuse.threshold: auto (estimated in each run from its decoys)")
    out = args.write or os.path.join(run_dir, "tuned.yaml")
    write_tuned_config(config, overrides, tuned_values(result, threshold), out,
                       provenance(config, split, result, overrides, threshold, cfg))
    again = " --out NEW_RUN_DIR" if os.path.exists(os.path.join(run_dir, "config.yaml")) else ""  # a run's folder
    log.info(f"tune: wrote {out}; run it with: copydet run {out}{again}")
