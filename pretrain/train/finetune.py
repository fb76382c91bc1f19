"""Instance-level fine-tuning: every training photo is a class, its recipe copies positives.

A batch is P photos x K copies; the loss (config ``finetune.loss``) is one of
:data:`pretrain.losses.LOSSES`. Training starts from ``spec.init_weights`` (a BYOL or any
local checkpoint) or random init. Each epoch is validated (μAP on synthetic copies of
held-aside photos, :mod:`pretrain.train.validate`); the best epoch's weights are kept in
``<run_dir>/best-<epoch>.safetensors`` and registered as ``spec.name`` when the run ends.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch
from torch import nn

from core.models.backbones import DescriptorModel, build_backbone
from core.models.checkpoint import save_checkpoint
from pretrain.data import CopyViews
from pretrain.losses import build_loss
from pretrain.recipes import get_recipe
from pretrain.train.common import (autocast, best_file, best_metrics, check_photos, drop_other_bests, epoch_loader,
                                    epochs, local_session, log_event, mean_loss, new_best, preprocess_for, run_photos,
                                    seed_worker, split_photos, start_or_resume, steps_of, unwrap)
from pretrain.train.registration import register_model, run_card
from pretrain.train.session import RaySession, Session
from pretrain.train.state import write_checkpoint
from pretrain.train.validate import make_validation_set, validate
from pretrain.train_config import RunSpec

BEST = "best"  # best-<epoch>.safetensors in the run folder (common.best_file)


class InstanceModel(nn.Module):
    """Descriptor model + loss in one module, so DDP also syncs the loss's class weights."""

    def __init__(self, model: DescriptorModel, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model(images), labels)


def finetune_loop(spec: RunSpec, session: Session) -> dict[str, Any]:
    """Fine-tune ``spec.backbone`` on ``spec.recipe`` copies; returns the last metrics."""
    hp = spec.finetune
    seed_worker(spec, session)
    backbone = build_backbone(spec.backbone, dim=spec.model.dim, img_size=spec.model.img_size,
                              pool=hp.pool or spec.model.pool, seed=spec.seed, checkpoint=spec.init_weights)
    train, val_refs, distractors = split_photos(spec, session)
    recipe = get_recipe(spec.recipe)
    net = InstanceModel(backbone, build_loss(hp.loss.name, num_classes=len(train), dim=backbone.dim,
                                             params=hp.loss.params))
    photos, pre = run_photos(spec, train), preprocess_for(spec, backbone)
    copies = CopyViews(photos, recipe, views=hp.copies, pre=pre, seed=spec.seed)
    loader, steps = epoch_loader(spec, session, copies, hp.photos_per_batch, hp.steps_per_epoch)
    val = None
    if val_refs and session.rank == 0:
        val = make_validation_set(val_refs, distractors, recipe, pre=pre, max_side=spec.data.max_side,
                                  backgrounds=photos)

    begin = start_or_resume(spec, session, net, "net",
                            lambda m: torch.optim.AdamW(m.parameters(), lr=hp.lr, weight_decay=hp.weight_decay),
                            photos)
    model, opt, start, train_time = begin.model, begin.opt, begin.epoch, begin.train_time
    best = begin.progress.get("best")

    metrics: dict[str, Any] = {}
    for epoch in epochs(spec, loader, model, start, hp.epochs):
        t0, losses = time.perf_counter(), []
        for _, (batch, labels) in steps_of(session, epoch, loader, steps, losses):
            losses.append(instance_step(model, batch, labels, opt, session.device))
        seconds = time.perf_counter() - t0
        train_time += seconds
        metrics = {"run": spec.name, "epoch": epoch, "loss": mean_loss(spec, epoch, losses),
                   "bad_photos": check_photos(spec, epoch, photos),
                   "images_per_s": len(losses) * hp.photos_per_batch * hp.copies * session.world_size / seconds}
        before = best
        if val is not None:
            found = validate(backbone, val)
            metrics.update(micro_ap=found.micro_ap, recall_at_p90=found.recall_at_p90)
            if improved := new_best(best, epoch, found):
                best = improved
                save_checkpoint(backbone, best_file(spec, BEST, best), meta={"best": best})
        log_event(spec, session.rank, {"event": "epoch", **metrics})
        progress = {"epoch": epoch, "train_time_s": train_time, "metrics": metrics, "best": best}
        card = run_card(spec, backbone, loss=hp.loss.name, train_time_s=train_time,
                        source_checkpoint=spec.init_weights)
        state = {"net": unwrap(model).state_dict(), "optimizer": opt.state_dict()}
        session.report(metrics, partial(write_checkpoint, model=backbone, card=card, state=state, progress=progress))
        if session.rank == 0:
            drop_other_bests(spec, BEST, best, before)

    if session.rank == 0:
        _register(spec, backbone, train_time, best)
    return metrics


def instance_step(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, opt: torch.optim.Optimizer,
                  device: torch.device) -> float:
    """One update on P photos x K copies (``batch``: P x K x 3 x H x W, ``labels``: P); the loss."""
    images = batch.flatten(0, 1).to(device, non_blocking=True)
    labels = labels.repeat_interleave(batch.shape[1]).to(device)
    with autocast(device):
        loss = model(images, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _register(spec: RunSpec, backbone: DescriptorModel, train_time: float, best: dict[str, Any] | None) -> None:
    """Register the best validated weights (the final ones when there is no validation)."""
    metrics = best_metrics(best)
    card = run_card(spec, backbone, loss=spec.finetune.loss.name, train_time_s=train_time,
                    source_checkpoint=spec.init_weights, metrics=metrics)
    weights = None if best is None else best_file(spec, BEST, best)
    register_model(spec, backbone, card, weights)
    log_event(spec, 0, {"event": "registered", "name": spec.name, **metrics})


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config`` is a :class:`RunSpec` as a dict."""
    finetune_loop(RunSpec.model_validate(config), RaySession())


def train_local(spec: RunSpec) -> dict[str, Any]:
    """Run the loop in this process (tests, benchmarks, inline fan-out members)."""
    return finetune_loop(spec, local_session(spec))
