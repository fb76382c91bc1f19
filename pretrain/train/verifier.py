"""Training copydet's learned verifier (a Reranking Transformer over region tokens).

The token model is frozen; only the pair transformer learns. Each step takes P recipe copies
(one of the run's set recipes per copy, drawn per photo and epoch) and scores every copy
against its original (copy), one of its photo's kNN-mined nearest neighbours (hard non-copy)
and another copy's original (non-copy), with a balanced binary cross-entropy. Each epoch is
validated (μAP of P(copy) on copies of held-aside photos against their nearest held-aside
photos, :mod:`pretrain.pairs`); the best epoch's weights are registered as a ``verifier`` card.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.models.cards import ModelCard
from core.models.encoders import Encoder, load_encoder
from core.models.registry import register
from core.models.resolve import resolve_model
from core.models.verifier import RegionTokens, VerifierSpec, build_net, region_tokens, save_verifier, verifier_card
from core.store import copy_file
from pretrain.pairs import CopyTokens, describe_photos, embed_photos, make_pair_validation, nearest_others, \
    training_pairs, validate_pairs, whole_image_cosine
from pretrain.photo_arrays import files_key, photo_array
from pretrain.photos import LazyPhotos, PhotoFiles
from pretrain.recipes import get_recipe
from pretrain.train.common import (best_file, best_metrics, check_photos, drop_other_bests, epoch_loader, epochs,
                                    local_session, log_event, mean_loss, new_best, run_photos, seed_worker,
                                    split_photos, start_or_resume, steps_of, unwrap)
from pretrain.train.registration import record_source, unregister
from pretrain.train.session import RaySession, Session
from pretrain.train.state import write_resume_state
from pretrain.train_config import RunSpec

BEST = "best-verifier"  # best-verifier-<epoch>.safetensors in the run folder (common.best_file)
WEIGHTS_FILE = "verifier.safetensors"
POSITIVE_WEIGHT = 2.0  # one positive per two negatives: balance the classes


def net_spec(spec: RunSpec) -> VerifierSpec:
    """The architecture part of the run's verifier section (what the card's build holds)."""
    return VerifierSpec.model_validate(spec.verifier.model_dump(include=set(VerifierSpec.model_fields)))


def verifier_loop(spec: RunSpec, session: Session) -> dict[str, Any]:
    """Train the verifier of ``spec``; returns the last metrics."""
    hp, arch = spec.verifier, net_spec(spec)
    seed_worker(spec, session)
    recipes = [get_recipe(r) for r in spec.recipe.split("+")]
    train, val_refs, distractors = split_photos(spec, session)
    photos = run_photos(spec, train)
    tokens = region_tokens(arch, spec.registry, str(session.device))
    miner = load_encoder(hp.miner, hp.miner_scale, registry=spec.registry, device=str(session.device))
    t0 = time.perf_counter()
    originals, neighbours = photo_arrays(spec, arch, train, photos, tokens, miner, session.rank == 0)
    val = None
    if len(val_refs) and session.rank == 0:
        val = make_pair_validation(run_photos(spec, val_refs), run_photos(spec, distractors), recipes, tokens, miner,
                                   hp.neighbours)
    described = {"event": "described", "photos": len(photos), "seconds": time.perf_counter() - t0}
    if val is not None:  # what the verifier must beat: the whole-image cosine of the token model
        described["val_whole_image_micro_ap"] = validate_pairs(val, whole_image_cosine).micro_ap
    log_event(spec, session.rank, described)
    copies = CopyTokens(photos, recipes, partial(region_tokens, arch, spec.registry), seed=spec.seed)
    loader, steps = epoch_loader(spec, session, copies, hp.photos_per_batch, hp.steps_per_epoch)
    net = build_net(arch, tokens.dim, seed=spec.seed)
    begin = start_or_resume(spec, session, net, "net",
                            lambda m: torch.optim.AdamW(m.parameters(), lr=hp.lr, weight_decay=hp.weight_decay),
                            photos)
    model, opt, train_time, best = begin.model, begin.opt, begin.train_time + time.perf_counter() - t0, \
        begin.progress.get("best")
    rng = np.random.default_rng([spec.seed, session.rank, begin.epoch])

    metrics: dict[str, Any] = {}
    for epoch in epochs(spec, loader, model, begin.epoch, hp.epochs):
        t0, losses = time.perf_counter(), []
        for _, (batch, index) in steps_of(session, epoch, loader, steps, losses):
            q, r, labels = training_pairs(batch, index, originals, neighbours, rng)
            losses.append(pair_step(model, q, r, labels, opt, session.device))
        seconds = time.perf_counter() - t0
        train_time += seconds
        metrics = {"run": spec.name, "epoch": epoch, "loss": mean_loss(spec, epoch, losses),
                   "bad_photos": check_photos(spec, epoch, photos),
                   "copies_per_s": len(losses) * hp.photos_per_batch * session.world_size / seconds}
        before = best
        if val is not None:
            found = validate_pairs(val, partial(_score, unwrap(model)))
            metrics.update(micro_ap=found.micro_ap, recall_at_p90=found.recall_at_p90)
            if improved := new_best(best, epoch, found):
                best = improved
                save_verifier(unwrap(model), best_file(spec, BEST, best))
        log_event(spec, session.rank, {"event": "epoch", **metrics})
        progress = {"epoch": epoch, "train_time_s": train_time, "metrics": metrics, "best": best}
        card = _card(spec, arch, None, train_time, best)
        state = {"net": unwrap(model).state_dict(), "optimizer": opt.state_dict()}
        session.report(metrics, partial(_write, net=unwrap(model), card=card, state=state, progress=progress))
        if session.rank == 0:
            drop_other_bests(spec, BEST, best, before)

    if session.rank == 0:
        _register(spec, arch, unwrap(model), train_time, best)
    return metrics


def photo_arrays(spec: RunSpec, arch: VerifierSpec, files: PhotoFiles, photos: LazyPhotos, tokens: RegionTokens,
                 miner: Encoder, compute: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every training photo's region tokens and mined neighbours, memory-mapped from the run
    folder (computed there the first time, by the worker told to ``compute``, rank 0: a resumed
    run, or a restarted worker, reuses them)."""
    hp, run = spec.verifier, Path(spec.run_dir)
    cards = [resolve_model(m, spec.registry).model_dump_json() for m in (arch.tokens, hp.miner)]
    made_of = (spec.data.max_side, arch.model_dump_json(), cards[0])
    originals = photo_array(run / "tokens.npy", files_key(files, *made_of), len(photos),
                            lambda a, b: describe_photos(photos, tokens, range(a, b)), compute=compute)
    mined_by = (spec.data.max_side, hp.miner_scale, cards[1], "replaced rows zero")
    desc = photo_array(run / "miner.npy", files_key(files, *mined_by), len(photos),
                       lambda a, b: embed_photos(photos, miner, range(a, b)), compute=compute)
    neighbours = photo_array(run / "neighbours.npy", files_key(files, *mined_by, hp.neighbours), len(photos),
                             lambda a, b: nearest_others(desc, hp.neighbours)[a:b], batch=len(photos),
                             compute=compute)
    return originals, neighbours


def pair_step(model: nn.Module, q: torch.Tensor, r: torch.Tensor, labels: torch.Tensor,
              opt: torch.optim.Optimizer, device: torch.device) -> float:
    """One update on aligned (query, candidate) token batches; returns the loss."""
    logits = model(q.to(device), r.to(device))
    weight = torch.where(labels > 0, POSITIVE_WEIGHT, 1.0).to(device)
    loss = F.binary_cross_entropy_with_logits(logits, labels.to(device), weight=weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def _score(net: nn.Module, queries: np.ndarray, candidates: np.ndarray, batch: int = 256) -> np.ndarray:
    """P(copy) of aligned token batches, in eval mode."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    out = [torch.sigmoid(net(torch.from_numpy(queries[i:i + batch]).to(device),
                             torch.from_numpy(candidates[i:i + batch]).to(device))).cpu()
           for i in range(0, len(queries), batch)]
    net.train(was_training)
    return torch.cat(out).numpy()


def _card(spec: RunSpec, arch: VerifierSpec, weights: str | None, train_time: float,
          best: dict[str, Any] | None) -> ModelCard:
    metrics = best_metrics(best)
    return verifier_card(spec.name, arch, resolve_model(arch.tokens, spec.registry), weights,
                         trained_on=spec.recipe, loss="bce", train_time_s=round(train_time, 1), metrics=metrics)


def _write(folder: Path, *, net: nn.Module, card: ModelCard, state: dict[str, Any], progress: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_verifier(net, folder / WEIGHTS_FILE)
    write_resume_state(folder, card=card, state=state, progress=progress)


def _register(spec: RunSpec, arch: VerifierSpec, net: nn.Module, train_time: float,
              best: dict[str, Any] | None) -> None:
    """Register the best validated weights (the final ones without validation); card last."""
    target = Path(spec.registry) / f"{spec.name}.safetensors"
    unregister(spec)
    if best is None:
        save_verifier(net, target)
    else:
        copy_file(best_file(spec, BEST, best), target)
    record_source(spec, target)
    register(_card(spec, arch, str(target.resolve()), train_time, best), spec.registry)
    log_event(spec, 0, {"event": "registered", "name": spec.name, **(best or {})})


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config`` is a :class:`RunSpec` as a dict."""
    verifier_loop(RunSpec.model_validate(config), RaySession())


def train_local(spec: RunSpec) -> dict[str, Any]:
    """Run the loop in this process (tests, inline fan-out members)."""
    return verifier_loop(spec, local_session(spec))
