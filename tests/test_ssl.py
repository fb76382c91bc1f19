"""BYOL: the loss falls, the loop checkpoints, registers and resumes; a Ray Train run survives
a killed worker and continues from its last checkpoint."""

import json
from pathlib import Path

import pytest
import torch

from core.models.backbones import build_backbone
from core.models.registry import load_card
from core.models.resolve import build_model
from pretrain.ssl import BYOL, momentum_at
from pretrain.train.byol import train_local
from pretrain.train.state import read_checkpoint
from pretrain.train_config import DataSection, ModelSection, PretrainSection, RunSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def byol_spec(photo_dir: Path, tmp: Path, epochs: int, **extra) -> RunSpec:
    return RunSpec(
        kind="byol", name="tiny-byol", backbone="tiny_cnn", recipe="byol_views", run_dir=str(tmp / "run"),
        registry=str(tmp / "registry"), seed=0, data=DataSection(train=str(photo_dir), max_side=64),
        model=ModelSection(dim=32, img_size=32),
        pretrain=PretrainSection(epochs=epochs, batch_size=8, proj_hidden=64, proj_dim=32, pred_hidden=64),
        **extra,
    )


def events(spec: RunSpec) -> list[dict]:
    return [json.loads(line) for line in (Path(spec.run_dir) / "events.jsonl").read_text().splitlines()]


def test_byol_loss_falls_on_fixed_views():
    torch.manual_seed(0)
    byol = BYOL(build_backbone("tiny_cnn", dim=32, img_size=32), proj_hidden=64, proj_dim=32, pred_hidden=64)
    x0, x1 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    x1 = 0.7 * x0 + 0.3 * x1  # two related "views"
    opt = torch.optim.SGD(byol.trainable_parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(25):
        loss = byol(x0, x1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        byol.update_target(momentum_at(step, 25, 0.9))
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3  # negative cosine: from ~0 towards -1
    assert not any(p.requires_grad for p in byol.backbone_momentum.parameters())


def test_momentum_schedule_ends_at_one():
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_at(100, 100, 0.99) == pytest.approx(1.0)


def test_loop_checkpoints_registers_and_resumes(photo_dir, tmp_path):
    first = train_local(byol_spec(photo_dir, tmp_path, epochs=2))
    assert first["epoch"] == 1 and first["loss"] == first["loss"]  # not NaN
    spec = byol_spec(photo_dir, tmp_path, epochs=3)
    train_local(spec)  # resumes after epoch 1: runs epoch 2 only
    log = events(spec)
    assert [e["epoch"] for e in log if e["event"] == "epoch"] == [0, 1, 2]
    assert [(e["epoch"], e["resumed"]) for e in log if e["event"] == "start"] == [(0, False), (2, True)]
    kept = sorted((Path(spec.run_dir) / "checkpoints").iterdir())
    assert [p.name for p in kept] == ["epoch-00001", "epoch-00002"]  # the newest two (KEEP_CHECKPOINTS)
    last = kept[-1]
    assert read_checkpoint(last).progress["epoch"] == 2

    stale = last.parent / ".epoch-00003.deadbeef.tmp"  # a checkpoint a killed run was writing
    stale.mkdir()
    train_local(byol_spec(photo_dir, tmp_path, epochs=4))  # numbered on from the newest kept, not from their count
    assert not stale.exists()
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch-00002", "epoch-00003"]
    last = last.parent / "epoch-00003"

    card = load_card("tiny-byol", tmp_path / "registry")
    assert card.loss == "byol" and card.dim == 32 and card.train_time_s > 0
    x = torch.randn(4, 3, 32, 32)
    from core.models.resolve import load_checkpoint
    registered, final = build_model(card).eval(), load_checkpoint(last / "model.safetensors").eval()
    assert torch.equal(registered(x), final(x))


def test_a_run_killed_while_it_registers_again_is_left_unregistered(photo_dir, tmp_path, monkeypatch):
    """More epochs on a registered run replace its weights: a kill before the new card is written
    must not leave the old card, whose hash the new weights no longer match, marking the run done."""
    import pretrain.train.registration as registration
    from core.models.registry import weights_hash
    train_local(byol_spec(photo_dir, tmp_path, epochs=1))
    spec = byol_spec(photo_dir, tmp_path, epochs=2)

    def dies(*args, **kwargs):  # the process dies once the new weights are written
        raise KeyboardInterrupt
    monkeypatch.setattr(registration, "register", dies)
    with pytest.raises(KeyboardInterrupt):
        train_local(spec)
    assert not (tmp_path / "registry" / "tiny-byol.json").exists()
    monkeypatch.undo()
    train_local(spec)  # resumes with no epoch left, and registers
    assert [e["event"] for e in events(spec)][-2:] == ["start", "registered"]
    card = load_card("tiny-byol", tmp_path / "registry")
    assert weights_hash(card) == card.weights_sha256


@pytest.mark.slow
def test_ray_train_resumes_after_worker_dies(ray_local, photo_dir, tmp_path):
    """A worker kills its own process 5 s into epoch 1 (once: a marker file remembers); Ray
    Train restarts the worker group, which resumes from the epoch-0 checkpoint."""
    from pretrain.train.launch import fit_trainer

    marker = tmp_path / "killed.txt"
    spec = byol_spec(photo_dir, tmp_path, epochs=3, num_workers=2,
                     fault={"epoch": 1, "marker": str(marker), "after_s": 5})
    metrics = fit_trainer(spec, cpus_per_worker=0.5, max_failures=2)
    assert marker.exists()
    assert metrics["epoch"] == 2
    log = events(spec)
    assert [e["epoch"] for e in log if e["event"] == "epoch"] == [0, 1, 2]  # epoch 0 not redone
    assert [(e["epoch"], e["resumed"]) for e in log if e["event"] == "start"] == [(0, False), (1, True)]
    assert load_card("tiny-byol", tmp_path / "registry").loss == "byol"


def test_a_diverged_run_stops_before_it_checkpoints_or_registers(photo_dir, tmp_path):
    """A NaN loss must not leave a registered card: that would mark the run done for every re-run."""
    from pretrain.train.common import TrainingDiverged
    spec = byol_spec(photo_dir, tmp_path, epochs=2)
    spec = spec.model_copy(update={"pretrain": spec.pretrain.model_copy(update={"lr": 1e12})})
    with pytest.raises(TrainingDiverged, match="tiny-byol.*diverged in epoch 0"):
        train_local(spec)
    assert not (tmp_path / "registry").exists() or not list((tmp_path / "registry").glob("tiny-byol*"))
    assert not list((Path(spec.run_dir) / "checkpoints").glob("epoch-*"))
    # a restart (Ray Train retries the worker) stops before it trains the diverged epoch again
    with pytest.raises(TrainingDiverged, match="tiny-byol.*diverged in epoch 0"):
        train_local(spec)
    assert [e["event"] for e in events(spec)] == ["start"]


def test_a_run_folder_resumes_only_with_the_settings_and_photos_it_was_started_with(photo_dir, tmp_path):
    """Other settings or photos would mix two runs in one folder's checkpoints; more epochs may be asked for."""
    import shutil

    from pretrain.train.common import RunChanged
    from tests.conftest import synthetic_photo
    photos = tmp_path / "photos"
    shutil.copytree(photo_dir, photos)
    train_local(byol_spec(photos, tmp_path, epochs=1))
    spec = byol_spec(photos, tmp_path, epochs=2)
    other = spec.model_copy(update={"pretrain": spec.pretrain.model_copy(update={"lr": 0.01})})
    with pytest.raises(RunChanged, match=r"pretrain\.lr: 0\.05 -> 0\.01"):
        train_local(other)
    synthetic_photo(999, (64, 48)).save(photos / "T999.jpg")
    with pytest.raises(RunChanged, match=r"count: 16 -> 17"):
        train_local(spec)
    (photos / "T999.jpg").unlink()
    assert train_local(spec)["epoch"] == 1  # as it was started, with one more epoch: resumes
    assert json.loads((Path(spec.run_dir) / "run.json").read_text())["count"] == 16
