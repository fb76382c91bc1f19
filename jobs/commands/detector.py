"""``copydet detector train CONFIG``: synthetic data (Ray tasks) -> YOLO -> registered detector card."""
from __future__ import annotations

import argparse
import logging

from core.yamlconf import read_yaml
from jobs.commands.base import arg, command
from jobs.config import RayConfig
from jobs.runtime import init_ray, run_tasks

log = logging.getLogger(__name__)


@command("detector", "train the copy-region detector on synthetic composites and register it",
         arg("action", choices=["train"], help="what to do"),
         arg("config", help="detector YAML (e.g. configs/detector/cpu.yaml)"),
         arg("--address", help="Ray cluster address (default: local Ray)"),
         uses_config=False)
def detector(args: argparse.Namespace) -> None:
    read_yaml(args.config)  # a missing or broken file is refused before the imports below take seconds
    from patchers.detector.train import load_detector_config, train_detector

    cfg = load_detector_config(args.config).anchored()
    init_ray(RayConfig(), args.address)
    card = train_detector(cfg, lambda fn, calls: run_tasks(fn, calls, "synth"))
    log.info(f"detector {card.name}: box recall@0.5 {card.metrics['box_recall50']:.3f}, "
        f"mAP50 {card.metrics['map50']:.3f}, {card.train_time_s:.0f} s -> {card.weights}")
