"""``copydet patch``: plan the patches of every image (a stage users also run on its own).

With image folders (``--queries`` ...) or no manifest yet, the manifest stage runs first
(undecodable files go to errors.parquet). ``--preset NAME`` replaces both sides' views:
queries get preset NAME, references ``ref_NAME`` when it exists (else NAME); later
``--set patches.query.KEY=...`` still override single numbers. ``--preview N`` writes
RUN/preview.png and RUN/preview.html for N images.
"""
from __future__ import annotations

import argparse
import logging

from core.store import exists, read_table
from jobs.commands.base import arg, command, positive_int
from jobs.commands.stages import FOLDER_ARGS, config_with_folders
from jobs.layout import RunDir, split_tables
from patchers.preview import write_preview
from patchers.views import PRESETS

log = logging.getLogger(__name__)

SIDE_PRESETS = sorted(p for p in PRESETS if not p.startswith("ref_"))


def preset_overrides(name: str) -> list[str]:
    """``--set`` items that give queries preset ``name`` and references ``ref_<name>`` (or ``name``)."""
    if name not in SIDE_PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {SIDE_PRESETS}")
    ref = f"ref_{name}" if f"ref_{name}" in PRESETS else name
    return [f"patches.query={{preset: {name}}}", f"patches.reference={{preset: {ref}}}"]


@command("patch", "manifest (or image folders) -> patches.parquet: geometric views, region proposals, "
         "detector boxes", *FOLDER_ARGS,
         arg("--preset", choices=SIDE_PRESETS, help="views for both sides (queries NAME, references ref_NAME where it exists, else NAME)"),
         arg("--preview", type=positive_int, metavar="N", help="write preview.png/.html of N images to the run folder"))
def patch(args: argparse.Namespace) -> None:
    from jobs.pipeline import run_stages

    presets = preset_overrides(args.preset) if args.preset else []
    folders = any(getattr(args, k, None) for k in ("train", "references", "queries"))
    cfg = config_with_folders(args, presets + list(args.set or []))
    run = RunDir(cfg.output)
    stages = ["manifest", "patch"] if folders or not exists(run.manifest) else ["patch"]
    run_stages(cfg, stages, address=args.address)
    if args.preview:
        png, page = write_preview(read_table(run.manifest), split_tables(run.patches), args.preview, run.root)
        log.info(f"patch: preview of up to {args.preview} images -> {png}, {page}")
