"""``copydet pretrain``, ``copydet finetune`` (training fan-outs) and ``copydet models``."""
from __future__ import annotations

import argparse
import logging
import os
from contextlib import nullcontext
from typing import TYPE_CHECKING, Literal

from core.imageio import IMAGE_SUFFIXES
from core.logs import log_to
from core.models.cards import ModelCard, RegistryError
from core.models.registry import load_card, registry_path, scan_cards
from core.store import join
from core.yamlconf import read_yaml
from jobs.commands.base import arg, command
from jobs.config import RayConfig
from jobs.runtime import init_ray

if TYPE_CHECKING:  # torch and timm load when a command trains, not with the command line
    from pretrain.train.fanout import Outcome
    from pretrain.train_config import RunSpec, TrainConfig

log = logging.getLogger(__name__)
Planner = Literal["plan_pretrain", "plan_finetune", "plan_verifier"]  # of pretrain.train.fanout, imported when run

TRAIN_ARGS = (
    arg("config", help="training YAML (see configs/train/)"),
    arg("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)"),
    arg("--address", help="Ray cluster address (default: the config's, else local Ray)"),
)


def _train(args: argparse.Namespace, plan: Planner) -> int:
    """Run the training config's runs that ``plan`` (a :mod:`pretrain.train.fanout` planner) lists."""
    read_yaml(args.config)  # a missing or broken file is refused before the imports below take seconds
    from pretrain.train import fanout
    from pretrain.train_config import load_train_config

    cfg = load_train_config(args.config, args.set).anchored()
    client = "://" in (args.address or cfg.ray.address or "")  # Ray Client: the folder is the cluster's, not here
    if not client and "://" not in cfg.data.train:
        check_train_folder(args.config, cfg.data.train)  # refused before Ray starts
    specs: list[RunSpec] = getattr(fanout, plan)(cfg)
    check_init_weights(cfg, specs)
    # the fan-out's lines, beside its run folders (with Ray Client those are the cluster's)
    with nullcontext() if client else log_to(join(cfg.output, "copydet.log")):
        log.info(f"{len(specs)} runs: {', '.join(s.name for s in specs)}")
        init_ray(RayConfig(address=args.address or cfg.ray.address))
        outcomes = fanout.run_all(specs, cfg.ray)
    rows = [[o.name, o.status, _fmt(o.metrics.get("loss")), _fmt(_registered_micro_ap(o, cfg)), o.error or o.note or ""]
            for o in outcomes]
    print(format_table(["run", "status", "last loss", "val uAP (registered)", "error / note"], rows))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def check_train_folder(config: str, folder: str) -> None:
    """:class:`FileNotFoundError` naming ``config``'s data.train when ``folder`` is not a folder or
    holds no image: refused at start, not by every run inside Ray."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{config}: data.train {folder} is not a folder")
    if not has_image(folder):
        raise FileNotFoundError(f"{config}: data.train {folder} holds no images "
                                f"(accepted extensions: {' '.join(IMAGE_SUFFIXES)})")


def check_init_weights(cfg: TrainConfig, specs: list[RunSpec]) -> None:
    """Refuse, before Ray starts, weights fine-tuning would start from that do not fit the model
    it trains (e.g. finetune.init naming another architecture's checkpoint), from the file's header."""
    from core.models.checkpoint import CheckpointError
    from core.models.resolve import weights_fit
    from pretrain.train.fanout import planned_cards

    starts = [s for s in specs if s.kind == "finetune" and s.init_weights and os.path.isfile(s.init_weights)]
    cards = planned_cards(cfg) if starts else {}
    for spec in starts:
        try:
            weights_fit(spec.init_weights, cards[spec.name].build)
        except CheckpointError as e:
            raise ValueError(f"finetune.init for {spec.name}: {e}") from None


def has_image(folder: str) -> bool:
    """Whether ``folder`` holds an image file, in sub-folders too (as training lists them); stops at
    the first, since a training folder may hold millions. A folder reached twice (symlinks) is skipped."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        if any(os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES and os.path.isfile(os.path.join(root, f))
               for f in files):
            return True
    return False


@command("pretrain", "BYOL-pretrain every backbone of a training config (Ray Train) and register them",
         *TRAIN_ARGS, uses_config=False)
def pretrain(args: argparse.Namespace) -> int:
    return _train(args, "plan_pretrain")


@command("finetune", "fine-tune sets x backbones (Ray Train fan-out); each finished model is registered",
         *TRAIN_ARGS, uses_config=False)
def finetune(args: argparse.Namespace) -> int:
    return _train(args, "plan_finetune")


@command("train-verifier", "train copydet's learned verifier (Ray Train) and register it (verify.method: learned)",
         *TRAIN_ARGS, uses_config=False)
def train_verifier(args: argparse.Namespace) -> int:
    return _train(args, "plan_verifier")


def _registered_micro_ap(outcome: Outcome, cfg: TrainConfig) -> float | None:
    """The validation μAP its registered card holds (the best epoch's), if any."""
    if outcome.status == "failed":
        return None
    try:
        return load_card(outcome.name, cfg.registry_dir()).metrics.get("micro_ap")
    except RegistryError:
        return None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def card_row(card: ModelCard) -> list[str]:
    uap = card.metrics.get("micro_ap")
    return [card.name, card.kind, card.arch, str(card.dim or ""), str(card.input_size), card.trained_on or "",
            card.loss or "", _fmt(uap), _fmt(card.train_time_s, 3), card.source_checkpoint or ""]


def models(args: argparse.Namespace) -> int:
    """`copydet models list` (registered with the other `models` actions in models_import.py): the
    valid cards as a table, and a one-line warning per invalid card file (which hides no other card)."""
    cards, problems = scan_cards(args.registry)
    for problem in problems:
        log.warning(f"skipped {problem}")
    header = ["name", "kind", "arch", "dim", "input", "trained_on", "loss", "val uAP", "train s", "source"]
    where = registry_path(args.registry)
    print(format_table(header, [card_row(c) for c in cards]) if cards else f"no models registered in {where}")
    return 0
