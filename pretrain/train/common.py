"""Pieces the training loops (BYOL, fine-tuning, the verifier) share: seeding, photos split,
loaders, preprocessing, mixed precision, resume, best epochs, events log (registration:
:mod:`pretrain.train.registration`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from core.logs import ProgressLines
from core.metrics import Metrics
from core.models.backbones import DescriptorModel
from core.models.checkpoint import sidecar_path
from core.models.preprocess import Preprocess
from core.models.registry import file_hash
from core.store import read_table, write_table, write_text
from pretrain.data import make_loader, set_loader_epoch
from pretrain.photo_arrays import files_key
from pretrain.photos import BadPhotos, LazyPhotos, PhotoFiles
from pretrain.train.registration import run_card
from pretrain.train.session import LocalSession, Session
from pretrain.train.state import read_checkpoint
from pretrain.train_config import RunSpec

T = TypeVar("T")


PHOTO_LIST = "photos.parquet"  # in the run folder: the photos its workers train on (image_id, path)


def listed_photos(spec: RunSpec, session: Session) -> PhotoFiles:
    """The run's photos: rank 0 lists the folder and writes ``<run_dir>/photos.parquet``, the
    other ranks read it after a barrier. One listing per start, and every rank trains on the
    same list even when files arrive in the folder meanwhile."""
    path = Path(spec.run_dir) / PHOTO_LIST
    if session.rank != 0:
        session.barrier()
        return PhotoFiles.from_table(read_table(path))
    files = PhotoFiles.from_folder(spec.data.train, spec.data.limit)
    write_table(files.to_table(), path)
    session.barrier()
    return files


def split_photos(spec: RunSpec, session: Session) -> tuple[PhotoFiles, PhotoFiles, PhotoFiles]:
    """(train, validation references, validation distractors) files, a fixed split by
    ``spec.seed`` of :func:`listed_photos`. Nothing is decoded here."""
    files = listed_photos(spec, session)
    held = spec.data.val_photos + spec.data.val_distractors
    if len(files) - held < 2:
        raise ValueError(
            f"{spec.data.train}: {len(files)} photos leave fewer than 2 to train on after holding "
            f"aside {held} for validation"
        )
    order = np.random.default_rng(spec.seed).permutation(len(files))
    val, distractors = files.take(order[: spec.data.val_photos]), files.take(order[spec.data.val_photos : held])
    return files.take(np.sort(order[held:])), val, distractors


def run_photos(spec: RunSpec, files: PhotoFiles) -> LazyPhotos:
    """``files`` decoded on demand, the photos replaced recorded in ``<run_dir>/bad-photos``."""
    return LazyPhotos(files, spec.data.max_side, BadPhotos(Path(spec.run_dir) / "bad-photos"))


class TooManyBadPhotos(RuntimeError):
    """More of a run's photos failed to decode or edit than ``data.max_bad_fraction`` allows."""


def check_photos(spec: RunSpec, epoch: int, photos: LazyPhotos) -> int:
    """How many photos the run has replaced so far; :class:`TooManyBadPhotos` (before the epoch
    checkpoints) when they are more than ``data.max_bad_fraction`` of ``photos``: a folder
    that is mostly unreadable is a mistake to report, not a training set."""
    assert photos.record is not None, "photos of a run record the ones replaced (run_photos)"
    bad = photos.record.reasons()
    if len(bad) > spec.data.max_bad_fraction * len(photos):
        path, reason = next(iter(bad.items()))
        raise TooManyBadPhotos(
            f"training run {spec.name!r}, epoch {epoch}: {len(bad)} of {len(photos)} photos in {spec.data.train} do "
            f"not decode or edit (more than data.max_bad_fraction={spec.data.max_bad_fraction}), e.g. {path}: "
            f"{reason}; all are listed in {photos.record.folder}")
    return len(bad)


def seed_worker(spec: RunSpec, session: Session) -> None:
    """Seed torch for this rank and cap its threads (``spec.torch_threads``), before anything is built."""
    torch.manual_seed(spec.seed + session.rank)
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)


def local_session(spec: RunSpec) -> LocalSession:
    """This process as the run's one worker (tests, benchmarks, inline fan-out members)."""
    return LocalSession(spec.run_dir, "cuda" if spec.use_gpu else "cpu")


def epoch_loader(spec: RunSpec, session: Session, dataset: Any, batch_size: int,
                 steps_per_epoch: int | None) -> tuple[Any, int]:
    """This rank's loader of ``dataset`` and the steps an epoch takes (at most ``steps_per_epoch``)."""
    loader = make_loader(dataset, batch_size, num_workers=spec.loader_workers, rank=session.rank,
                         world_size=session.world_size, seed=spec.seed)
    return loader, min(len(loader), steps_per_epoch or len(loader))


def preprocess_for(spec: RunSpec, model: DescriptorModel) -> Preprocess:
    """How pixels become input to the model being trained: its card's preprocessing at the
    training size, the same one extraction will use for the registered model."""
    return Preprocess.for_card(run_card(spec, model), spec.model.img_size)


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bfloat16 autocast on a GPU (no loss scaling needed); full precision on the CPU."""
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


def maybe_crash(spec: RunSpec, epoch: int) -> None:
    """Test hook: kill this worker process once at ``fault.epoch`` (a marker file makes it once),
    ``fault.after_s`` seconds into the epoch. Ray Train V2 collects reports on its health
    check (every 2 s): a worker that dies sooner after a report loses that checkpoint."""
    if spec.fault is None or epoch != spec.fault["epoch"]:
        return
    marker = Path(spec.fault["marker"])
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"killed pid {os.getpid()} at epoch {epoch}\n")
    time.sleep(float(spec.fault.get("after_s", 0)))
    os._exit(1)


@dataclass
class Start:
    """Where a training loop begins: its prepared model and optimiser, and the resumed progress."""

    model: nn.Module  # wrapped for distributed training by the session
    opt: torch.optim.Optimizer
    epoch: int
    train_time: float
    progress: dict[str, Any]  # the checkpoint's progress; {} on a fresh start


EVENTS = "events.jsonl"  # in the run folder: the run's progress log (:func:`log_event`)
PIN = "run.json"  # in the run folder: the settings and photos it was started with (:func:`check_pin`)
UNPINNED = {"run_dir", "registry", "num_workers", "use_gpu", "loader_workers", "torch_threads", "fault"}
EPOCHS_OF = {"byol": "pretrain", "finetune": "finetune", "verifier": "verifier"}  # run kind -> section: its
# ``epochs`` may grow on a resume


class RunChanged(ValueError):
    """A run folder resumed with other settings or other photos than it was started with."""


def pinned_settings(spec: RunSpec) -> dict[str, Any]:
    """The settings a run's checkpoints depend on: not where or on how many workers it runs, nor
    how many epochs (they may grow), nor the sections of the other kinds of run (a BYOL run does
    not depend on ``finetune.lr``); the weights it starts from by content too (a BYOL model
    trained on for more epochs is registered again under the same path)."""
    others = {section for kind, section in EPOCHS_OF.items() if kind != spec.kind}  # other kinds' sections
    settings = spec.model_dump(mode="json", exclude=UNPINNED | others)
    settings[EPOCHS_OF[spec.kind]].pop("epochs")
    settings["data"].pop("max_bad_fraction")  # may be raised to resume a run that stopped on it
    settings["init_sha256"] = file_hash(spec.init_weights) if spec.init_weights else None
    return settings


def asked_epochs(spec: RunSpec) -> int:
    return getattr(spec, EPOCHS_OF[spec.kind]).epochs


def trained_epochs(spec: RunSpec) -> int | None:
    """How many epochs the run's registered model was trained for, by its log (None: no log, or
    nothing registered). An epoch logged after the last registration does not count: the process
    may have died before it registered that epoch. A line left half-written is skipped."""
    path = Path(spec.run_dir) / EVENTS
    if not path.is_file():
        return None
    last, registered = -1, None
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if record.get("event") == "epoch":
                last = max(last, record["epoch"])
            elif record.get("event") == "registered":
                registered = last + 1
    return registered


def pin_changes(spec: RunSpec, pin: dict[str, Any]) -> list[str]:
    """``key: was -> now`` for what ``pin`` changes against the run folder's ``run.json``, over
    ``pin``'s own entries (none without a ``run.json``; a setting no longer pinned is no change)."""
    path = Path(spec.run_dir) / PIN
    if not path.is_file():
        return []
    was = _flat({k: v for k, v in json.loads(path.read_text()).items() if k in pin})
    now = _flat(pin)
    return [f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(now) if was.get(k) != now.get(k)]


def check_pin(spec: RunSpec, rank: int, files: PhotoFiles, resuming: bool) -> None:
    """Write ``<run_dir>/run.json`` (settings, photo list) on a fresh start; on a resume refuse
    other settings or photos (their checkpoints would mix two runs: class count, labels,
    held-aside photos, recipe)."""
    pin = {"settings": pinned_settings(spec), "photos": files_key(files), "count": len(files)}
    path = Path(spec.run_dir) / PIN
    if not resuming or not path.is_file():  # a fresh start, or a folder from before the pin
        if rank == 0:
            write_text(path, json.dumps(pin, indent=2))
        return
    changed = pin_changes(spec, pin)
    if changed:
        raise RunChanged(f"{spec.run_dir}: training run {spec.name!r} was started with other settings or photos "
                         f"({'; '.join(changed[:8])}); resume it as it was, or train into a new output folder")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def start_or_resume(spec: RunSpec, session: Session, net: nn.Module, key: str,
                    make_opt: Callable[[nn.Module], torch.optim.Optimizer], photos: LazyPhotos) -> Start:
    """Load the latest checkpoint (``state[key]`` into ``net``, then the optimiser) of a run
    started with the same settings and photos (:func:`check_pin`), prepare the model for the
    session and log the start. A run restarted after it diverged or stopped on bad photos stops
    again here, not an epoch later (:func:`check_not_diverged`, :func:`check_photos`)."""
    check_not_diverged(spec)
    resume = session.load_latest(read_checkpoint)
    check_pin(spec, session.rank, photos.files, resume is not None)
    if resume is not None:
        net.load_state_dict(resume.state[key])
    model = session.prepare(net)
    opt = make_opt(model)
    progress: dict[str, Any] = {}
    if resume is not None:
        opt.load_state_dict(resume.state["optimizer"])
        progress = resume.progress
    start = Start(model, opt, progress["epoch"] + 1 if progress else 0, progress.get("train_time_s", 0.0), progress)
    check_photos(spec, start.epoch, photos)
    log_event(spec, session.rank, {"event": "start", "epoch": start.epoch, "resumed": resume is not None})
    return start


def epochs(spec: RunSpec, loader: Any, model: nn.Module, start: int, stop: int) -> Iterator[int]:
    """Epochs ``start..stop-1``, each after the fault hook, with the loader's epoch and train mode set."""
    for epoch in range(start, stop):
        maybe_crash(spec, epoch)
        set_loader_epoch(loader, epoch)
        model.train()
        yield epoch


def steps_of(session: Session, epoch: int, loader: Iterable[T], steps: int, losses: list[float],
             every_s: float = 60.0) -> Iterator[tuple[int, T]]:
    """``(step, batch)`` for the epoch's first ``steps`` batches; rank 0 prints a line every
    ``every_s`` seconds (an epoch at DISC21 scale takes hours): the step, the mean of the last
    100 ``losses`` and the time left."""
    lines = ProgressLines(f"epoch {epoch}: step", steps, every_s, enabled=session.rank == 0)
    for step, batch in zip(range(steps), loader):
        yield step, batch
        recent = losses[-100:] or [math.nan]
        lines.tick(step + 1, f", loss {sum(recent) / len(recent):.4g}")


def best_file(spec: RunSpec, stem: str, best: dict[str, Any]) -> Path:
    """The weights of the best validated epoch, named by that epoch: the record of which epoch is
    best lives in the checkpoint's progress, so a run killed after writing a new best file but
    before its checkpoint resumes with the file its progress names."""
    return Path(spec.run_dir) / f"{stem}-{best['epoch']:05d}.safetensors"


def new_best(best: dict[str, Any] | None, epoch: int, found: Metrics) -> dict[str, Any] | None:
    """The best-epoch record of ``epoch`` when its validation ``found`` beats ``best`` (μAP), else None."""
    if best is not None and found.micro_ap <= best["micro_ap"]:
        return None
    return {"epoch": epoch, "micro_ap": found.micro_ap, "recall_at_p90": found.recall_at_p90}


def best_metrics(best: dict[str, Any] | None) -> dict[str, float]:
    """A best-epoch record's figures, as the registered card holds them (none without validation)."""
    return {} if best is None else {k: float(v) for k, v in best.items() if k != "epoch"}


def drop_other_bests(spec: RunSpec, stem: str, *keep: dict[str, Any] | None) -> None:
    """Delete the best-weights files (and sidecars) of other epochs than those of ``keep``: the
    best the newest checkpoint records and the one before it (Ray Train registers a reported
    checkpoint a moment later; a worker that dies before resumes from the one before)."""
    kept = {best_file(spec, stem, best) for best in keep if best}
    for f in Path(spec.run_dir).glob(f"{stem}-*.safetensors"):
        if f not in kept:
            f.unlink()
            sidecar_path(f).unlink(missing_ok=True)


class TrainingDiverged(RuntimeError):
    """A run's loss stopped being a number: nothing of that epoch is saved or registered."""


DIVERGED = "diverged.txt"  # in the run folder: why the run stopped; a restart stops at once


def mean_loss(spec: RunSpec, epoch: int, losses: list[float]) -> float:
    """The epoch's mean loss. A non-finite one stops the run before it checkpoints or registers
    the diverged weights (a registered card would mark the run done, and a re-run would skip it),
    and is written to ``<run_dir>/diverged.txt`` (:func:`check_not_diverged`)."""
    loss = sum(losses) / len(losses)
    if not math.isfinite(loss):
        bad = sum(not math.isfinite(x) for x in losses)
        why = (f"training run {spec.name!r} diverged in epoch {epoch}: mean loss {loss} ({bad} of {len(losses)} "
               "steps not finite); train it into a new output folder with a lower learning rate (this folder's "
               "run.json pins the one it was started with)")
        write_text(Path(spec.run_dir) / DIVERGED, why + "\n")
        raise TrainingDiverged(why)
    return loss


def check_not_diverged(spec: RunSpec) -> None:
    """:class:`TrainingDiverged` at once for a run folder whose run diverged: a restart (Ray
    Train retries a failed worker) would resume before the diverged epoch and train it again."""
    path = Path(spec.run_dir) / DIVERGED
    if path.is_file():
        raise TrainingDiverged(path.read_text().strip())


def log_event(spec: RunSpec, rank: int, record: dict[str, Any]) -> None:
    """Append ``record`` to ``<run_dir>/events.jsonl`` (rank 0): the run's progress log."""
    if rank != 0:
        return
    path = Path(spec.run_dir) / EVENTS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
