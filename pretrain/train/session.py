"""Where a training loop runs: in this process (:class:`LocalSession`) or as a Ray Train
worker (:class:`RaySession`). The loops are written once against this small interface.

A checkpoint is a folder (see :mod:`pretrain.train.state`). In Ray, rank 0 writes it into a
temporary folder that ``ray.train.Checkpoint.from_directory`` hands to ``ray.train.report``,
and the latest one comes back from ``ray.train.get_checkpoint()`` after a worker failure.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from core.store import atomic_dir

T = TypeVar("T")
Writer = Callable[[Path], None]
KEEP_CHECKPOINTS = 2  # newest checkpoints a run keeps, locally and in Ray Train (model + optimiser: GBs)


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move to the device and, with several workers, wrap for data parallelism."""

    def barrier(self) -> None:
        """Wait until every worker of the run is here."""

    def load_latest(self, read: Callable[[Path], T]) -> T | None:
        """``read(folder)`` of the latest checkpoint of this run, None if there is none."""

    def report(self, metrics: dict[str, Any], write: Writer | None = None) -> None:
        """Log ``metrics``; with ``write``, rank 0 saves a checkpoint folder through it."""


def _log(metrics: dict[str, Any]) -> None:
    """One progress line per report on stdout (Ray forwards worker output to the driver)."""
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()), flush=True)


class LocalSession:
    """One process; checkpoints in ``<run_dir>/checkpoints/epoch-NNNNN`` (the newest
    :data:`KEEP_CHECKPOINTS`), metrics in ``<run_dir>/metrics.jsonl``."""

    rank = 0
    world_size = 1

    def __init__(self, run_dir: str | Path, device: str | torch.device = "cpu") -> None:
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        done = self._checkpoints()
        self.count = int(done[-1].name.split("-")[1]) + 1 if done else 0
        for stale in (self.run_dir / "checkpoints").glob(".epoch-*.tmp"):  # a killed writer's (one writer a run)
            shutil.rmtree(stale, ignore_errors=True)

    def _checkpoints(self) -> list[Path]:
        return sorted((self.run_dir / "checkpoints").glob("epoch-*"))

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def barrier(self) -> None:
        pass

    def load_latest(self, read: Callable[[Path], T]) -> T | None:
        done = self._checkpoints()
        return read(done[-1]) if done else None

    def report(self, metrics: dict[str, Any], write: Writer | None = None) -> None:
        _log(metrics)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        if write is not None:
            with atomic_dir(self.run_dir / "checkpoints" / f"epoch-{self.count:05d}") as tmp:
                write(tmp)  # a checkpoint folder that exists is complete
            self.count += 1
            for old in self._checkpoints()[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old)


class RaySession:
    """A Ray Train worker: DDP through ``prepare_model`` (gloo on CPU, NCCL on GPU)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()  # the process group Ray Train set up (gloo or NCCL)

    def load_latest(self, read: Callable[[Path], T]) -> T | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as folder:
            return read(Path(folder))

    def report(self, metrics: dict[str, Any], write: Writer | None = None) -> None:
        import ray.train

        if self.rank == 0:
            _log(metrics)
        if write is None or self.rank != 0:
            ray.train.report(metrics)  # every rank reports: report is a barrier
            return
        with tempfile.TemporaryDirectory(prefix="copydet-ckpt-") as tmp:
            write(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
