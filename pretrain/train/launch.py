"""Run one training run: as a Ray Train ``TorchTrainer`` fit, or in this process.

The loop is the same function either way (see :mod:`pretrain.train.session`); only the
session differs. ``fit_trainer`` sets DDP on gloo (CPU) or NCCL (GPU), the worker count and
the failure policy at the call site, never in the loop. Either holds the run folder's lock
(:func:`core.lock.folder_lock`): a second process training into it is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.lock import folder_lock
from pretrain.train import byol, finetune, verifier
from pretrain.train.session import KEEP_CHECKPOINTS
from pretrain.train_config import RunSpec

RAY_LOOPS: dict[str, Callable[[dict[str, Any]], None]] = {
    "byol": byol.train_loop_per_worker,
    "finetune": finetune.train_loop_per_worker,
    "verifier": verifier.train_loop_per_worker,
}
LOCAL_LOOPS: dict[str, Callable[[RunSpec], dict[str, Any]]] = {
    "byol": byol.train_local,
    "finetune": finetune.train_local,
    "verifier": verifier.train_local,
}
BUSY_HINT = "train into another output folder"


def fit_trainer(spec: RunSpec, *, cpus_per_worker: float = 1.0, max_failures: int = 2) -> dict[str, Any]:
    """Fit ``spec`` with Ray Train (Ray must be initialised); returns the last reported metrics.

    Checkpoints and Ray's run state go to ``<run_dir>/ray``; a worker that dies is restarted
    and the loop resumes from the latest checkpoint, up to ``max_failures`` times.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})}
    trainer = TorchTrainer(
        RAY_LOOPS[spec.kind],
        train_loop_config=spec.model_dump(),
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name="ray",
            storage_path=str(Path(spec.run_dir).resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        ),
    )
    with folder_lock(spec.run_dir, BUSY_HINT):
        result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training run {spec.name!r} failed: {result.error}") from result.error
    return dict(result.metrics or {})


def fit_local(spec: RunSpec) -> dict[str, Any]:
    """Run ``spec``'s loop in this process (one worker, checkpoints under ``run_dir``)."""
    with folder_lock(spec.run_dir, BUSY_HINT):
        return LOCAL_LOOPS[spec.kind](spec)
