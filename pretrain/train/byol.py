"""BYOL pretraining loop: ``byol_loop(spec, session)``, and the Ray Train entry point.

Each epoch ends with a report (loss, images/s) and a checkpoint; a restarted run continues
after the last checkpointed epoch. The finished backbone is registered as ``spec.name``.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch
from torch import nn

from core.models.backbones import build_backbone
from pretrain.data import CopyViews
from pretrain.recipes import get_recipe
from pretrain.ssl import BYOL, momentum_at
from pretrain.train.common import (autocast, check_photos, epoch_loader, epochs, local_session, log_event, mean_loss,
                                    preprocess_for, run_photos, seed_worker, split_photos, start_or_resume, steps_of,
                                    unwrap)
from pretrain.train.registration import register_model, run_card
from pretrain.train.session import RaySession, Session
from pretrain.train.state import write_checkpoint
from pretrain.train_config import RunSpec


def byol_loop(spec: RunSpec, session: Session) -> dict[str, Any]:
    """Pretrain ``spec.backbone`` with BYOL on the training photos; returns the last metrics."""
    hp = spec.pretrain
    seed_worker(spec, session)
    backbone = build_backbone(
        spec.backbone, dim=spec.model.dim, img_size=spec.model.img_size, pool=spec.model.pool, seed=spec.seed
    )
    byol = BYOL(backbone, proj_hidden=hp.proj_hidden, proj_dim=hp.proj_dim, pred_hidden=hp.pred_hidden)
    files, _, _ = split_photos(spec, session)
    photos = run_photos(spec, files)
    views = CopyViews(photos, get_recipe(hp.recipe), views=2,
                      pre=preprocess_for(spec, backbone), seed=spec.seed)
    loader, steps = epoch_loader(spec, session, views, hp.batch_size, hp.steps_per_epoch)

    begin = start_or_resume(spec, session, byol, "byol", lambda m: torch.optim.SGD(
        unwrap(m).trainable_parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay), photos)
    model, opt, start, train_time = begin.model, begin.opt, begin.epoch, begin.train_time

    metrics: dict[str, Any] = {}
    for epoch in epochs(spec, loader, model, start, hp.epochs):
        t0, losses = time.perf_counter(), []
        for step, (batch, _) in steps_of(session, epoch, loader, steps, losses):
            momentum = momentum_at(epoch * steps + step, hp.epochs * steps, *hp.momentum)
            losses.append(byol_step(model, batch, opt, momentum, session.device))
        seconds = time.perf_counter() - t0
        train_time += seconds
        metrics = {"run": spec.name, "epoch": epoch, "loss": mean_loss(spec, epoch, losses),
                   "bad_photos": check_photos(spec, epoch, photos), "momentum": momentum,
                   "images_per_s": len(losses) * hp.batch_size * 2 * session.world_size / seconds}  # 2 views
        log_event(spec, session.rank, {"event": "epoch", **metrics})
        progress = {"epoch": epoch, "train_time_s": train_time, "metrics": metrics}
        card = run_card(spec, backbone, loss="byol", train_time_s=train_time)
        state = {"byol": unwrap(model).state_dict(), "optimizer": opt.state_dict()}
        session.report(metrics, partial(write_checkpoint, model=backbone, card=card, state=state, progress=progress))

    if session.rank == 0:
        register_model(spec, backbone, run_card(spec, backbone, loss="byol", train_time_s=train_time))
        log_event(spec, session.rank, {"event": "registered", "name": spec.name})
    return metrics


def byol_step(model: nn.Module, batch: torch.Tensor, opt: torch.optim.Optimizer, momentum: float,
              device: torch.device) -> float:
    """One BYOL update on ``batch`` (B x 2 views x 3 x H x W), then the target EMA; the loss."""
    batch = batch.to(device, non_blocking=True)
    with autocast(device):
        loss = model(batch[:, 0], batch[:, 1])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    unwrap(model).update_target(momentum)
    return float(loss.detach())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config`` is a :class:`RunSpec` as a dict."""
    byol_loop(RunSpec.model_validate(config), RaySession())


def train_local(spec: RunSpec) -> dict[str, Any]:
    """Run the loop in this process (tests, benchmarks, inline fan-out members)."""
    return byol_loop(spec, local_session(spec))
