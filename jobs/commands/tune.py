"""``copydet tune CONFIG``: tune beta and fusion on a validation split, write a config ``copydet run`` uses."""
from __future__ import annotations

import argparse
import logging
import os

from jobs.commands.base import arg, command
from jobs.config import ConfigError, load_config
from jobs.tune import (
    BETA_GRID,
    format_table,
    provenance,
    tune_on_split,
    tuned_values,
    user_split,
    write_tuned_config,
)
from pretrain.synthetic import SplitSpec, make_synthetic_split

log = logging.getLogger(__name__)


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
         "or synthetic copies of train photos) and write a tuned config",
         arg("--validation-queries", help="folder of validation queries (with --validation-ground-truth)"),
         arg("--validation-ground-truth", help="CSV query_id,reference_id for the validation queries"),
         arg("--recipe", default="basic", help="augmentation recipe for synthetic copies (default: basic)"),
         arg("--photos", type=int, help="train photos held out for a synthetic split (default: "
             "min(400, half of train/))"),
         arg("--background", type=int, help="train photos kept as the normalisation background (default: "
             "all the others)"),
         arg("--seed", type=int, default=0, help="seed of the synthetic split (default 0)"),
         arg("--beta-grid", type=beta_grid, default=list(BETA_GRID),
             help=f"comma-separated betas to try (default {','.join(f'{b:g}' for b in BETA_GRID)})"),
         arg("--write", help="tuned config to write (default: RUN_DIR/tuned.yaml)"))
def tune(args: argparse.Namespace) -> None:
    if not args.config:
        raise ConfigError("copydet tune: give the CONFIG to tune (the tuned file is written from it)")
    if bool(args.validation_queries) != bool(args.validation_ground_truth):
        raise ConfigError("copydet tune: give both --validation-queries and --validation-ground-truth, or neither")
    overrides = [*(args.set or []), *([f"output={args.out}"] if args.out else [])]
    cfg = load_config(args.config, overrides)
    run_dir = cfg.output
    if "://" in run_dir:
        raise ConfigError(f"copydet tune: the run folder must be a local path, got {run_dir}")
    if args.validation_queries:
        split = user_split(cfg, args.validation_queries, args.validation_ground_truth)
    else:
        train = cfg.data.folders().get("train")
        if train is None:
            raise ConfigError(f"{args.config}: no train folder to make a synthetic validation split from; "
                              "pass --validation-queries and --validation-ground-truth")
        spec = SplitSpec(args.photos, args.recipe, args.seed, args.background)
        split = make_synthetic_split(train, os.path.join(run_dir, "tune", "data"), spec)
    result = tune_on_split(cfg, split, run_dir, args.beta_grid, args.address)
    print(format_table(result))
    out = args.write or os.path.join(run_dir, "tuned.yaml")
    write_tuned_config(args.config, overrides, tuned_values(result), out,
                       provenance(args.config, split, result, overrides))
    log.info(f"tune: wrote {out}; run it with: copydet run {out}")
