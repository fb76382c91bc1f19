"""Fine-tuning loop (validation, best checkpoint, registration), training configs, fan-out, CLI."""

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image

from core.models.backbones import build_backbone
from core.models.checkpoint import save_checkpoint
from core.models.registry import list_cards, load_card, register
from core.models.resolve import build_model, load_checkpoint
from jobs.cli import main as copydet
from pretrain.train.common import PIN, RunChanged, pinned_settings
from pretrain.train.fanout import finished, plan_finetune, plan_pretrain, run_all
from pretrain.train.finetune import train_local
from pretrain.train.registration import record_source, register_model, run_card
from pretrain.train_config import (
    DataSection,
    FinetuneSection,
    ModelSection,
    RunSpec,
    TrainConfigError,
    load_train_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"


def test_finetune_validates_keeps_best_and_registers(photo_dir, tmp_path):
    init = save_checkpoint(build_backbone("tiny_cnn", dim=32, img_size=32, seed=5), tmp_path / "init.safetensors")
    spec = RunSpec(
        kind="finetune", name="tiny-ft", backbone="tiny_cnn", recipe="basic", run_dir=str(tmp_path / "run"),
        registry=str(tmp_path / "registry"), seed=0, model=ModelSection(dim=32, img_size=32),
        data=DataSection(train=str(photo_dir), val_photos=4, val_distractors=2, max_side=64),
        finetune=FinetuneSection(epochs=2, photos_per_batch=4, copies=2, loss={"name": "cosface"}),
        init_weights=str(init),
    )
    train_local(spec)
    log = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    uaps = [e["micro_ap"] for e in log if e["event"] == "epoch"]
    assert len(uaps) == 2 and all(0.0 <= u <= 1.0 for u in uaps)

    card = load_card("tiny-ft", tmp_path / "registry")
    assert card.metrics["micro_ap"] == pytest.approx(max(uaps))  # the best epoch is registered
    assert (card.loss, card.trained_on, card.source_checkpoint) == ("cosface", "basic", str(init))
    assert card.dim == 32 and card.input_size == 32 and card.train_time_s > 0
    x = torch.randn(3, 3, 32, 32)
    best_epoch = max(range(2), key=lambda e: uaps[e])  # the first of equals
    kept = sorted(p.name for p in (tmp_path / "run").glob("best-*.safetensors"))
    assert f"best-{best_epoch:05d}.safetensors" in kept and len(kept) <= 2  # the best and the one before it
    best = load_checkpoint(tmp_path / "run" / f"best-{best_epoch:05d}.safetensors").eval()
    assert torch.equal(build_model(card).eval()(x), best(x))

    # the weights it started from, registered again with other content: its checkpoints are not theirs
    save_checkpoint(build_backbone("tiny_cnn", dim=32, img_size=32, seed=6), init)
    longer = spec.model_copy(update={"finetune": spec.finetune.model_copy(update={"epochs": 3})})
    with pytest.raises(RunChanged, match="init_sha256"):
        train_local(longer)


def test_finetune_pool_reads_a_gem_checkpoint_by_regions(photo_dir, tmp_path):
    gem = build_backbone("tiny_cnn", dim=None, img_size=32, seed=5)  # e.g. a BYOL trunk, no projection
    init = save_checkpoint(gem, tmp_path / "byol.safetensors")
    spec = RunSpec(
        kind="finetune", name="tiny-grid", backbone="tiny_cnn", recipe="basic", run_dir=str(tmp_path / "run"),
        registry=str(tmp_path / "registry"), seed=0, model=ModelSection(dim=None, img_size=32),
        data=DataSection(train=str(photo_dir), val_photos=4, val_distractors=2, max_side=64),
        finetune=FinetuneSection(epochs=1, photos_per_batch=4, copies=2, pool="gem_grid2"),
        init_weights=str(init),
    )
    train_local(spec)
    card = load_card("tiny-grid", tmp_path / "registry")
    assert card.build["pool"] == "gem_grid2" and card.dim == 4 * gem.dim
    assert build_model(card).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4 * gem.dim)


@pytest.mark.parametrize("name", ["tiny", "cpu", "cluster"])
def test_shipped_configs_validate(name):
    cfg = load_train_config(CONFIGS / f"{name}.yaml")
    assert len(plan_pretrain(cfg)) == len(cfg.backbones)
    if name == "cluster":
        assert len(cfg.set_recipes()) * len(cfg.backbones) == 33
        assert [s.model.img_size for s in plan_pretrain(cfg)] == [320, 288, 224]
        assert cfg.ray.use_gpu and cfg.ray.num_workers == 8


def test_relative_paths_are_read_where_the_command_runs(tmp_path, monkeypatch):
    """A Ray Train worker runs in its own folder: the train commands give every run the YAML's
    relative folders as absolute paths, resolved against the folder the command was started in."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COPYDET_REGISTRY", "reg")
    cfg = load_train_config(CONFIGS / "tiny.yaml", ["data.train=photos", "output=out", "registry=null"])
    assert cfg.output == "out"  # as written: `copydet submit` refuses relative folders
    spec = plan_pretrain(cfg.anchored())[0]
    assert spec.data.train == str(tmp_path / "photos")
    assert spec.run_dir.startswith(str(tmp_path / "out") + "/") and spec.registry == str(tmp_path / "reg")
    assert load_train_config(CONFIGS / "tiny.yaml").anchored().registry == str(tmp_path / "runs/train-tiny/models")


@pytest.mark.parametrize(
    "override, message",
    [("finetune.los=1", "finetune.los: unknown key"),
     ("backbones=[resnet9]", "unknown ['resnet9']"),
     ("sets=3", "exactly one of sets"),
     ("finetune.loss.name=hinge", "finetune.loss.name"),
     ("finetune.loss.params.scale=abc", "finetune.loss: loss 'arcface': bad parameters {'scale': 'abc'"),
     ("pretrain.epochs=0", "pretrain.epochs")],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(TrainConfigError, match="tiny.yaml") as err:
        load_train_config(CONFIGS / "tiny.yaml", [override])
    assert message in str(err.value)


@pytest.mark.slow
def test_fanout_registers_one_model_per_set_and_backbone(ray_local, photo_dir, tmp_path, capsys):
    """2 recipes x 2 tiny backbones as inline Ray tasks -> 4 models; a broken run fails alone;
    a second fan-out skips what is registered."""
    registry = tmp_path / "registry"
    sets = [f"data.train={photo_dir}", f"registry={registry}", f"output={tmp_path / 'runs'}"]
    cfg = load_train_config(CONFIGS / "tiny.yaml", sets)
    specs = plan_finetune(cfg)
    broken = specs[0].model_copy(update={"name": "broken", "run_dir": str(tmp_path / "runs" / "broken"),
                                         "data": specs[0].data.model_copy(update={"train": str(tmp_path / "missing")})})
    outcomes = run_all([*specs, broken], cfg.ray)
    status = {o.name: o.status for o in outcomes}
    assert status == {**{s.name: "done" for s in specs}, "broken": "failed"}
    assert "does not exist" in outcomes[-1].error
    cards = list_cards(registry)
    assert sorted(c.name for c in cards) == sorted(s.name for s in specs) and len(cards) == 4
    assert {(c.arch, c.trained_on) for c in cards} == {
        (b, r) for b in ("tiny_cnn", "tiny_vit") for r in ("basic", "overlay_text")}
    assert all(c.loss == "arcface" and "micro_ap" in c.metrics for c in cards)
    # the CLI plans the same runs and finds them all registered
    assert copydet(["finetune", str(CONFIGS / "tiny.yaml"), *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 4 and all(f"{c.metrics['micro_ap']:.4g}" in out for c in cards)  # best epoch's
    logged = (tmp_path / "runs" / "copydet.log").read_text()  # the fan-out's lines, beside its run folders
    assert all(f"[fan-out] {s.name}: skipped" in logged for s in specs)
    # with another learning rate the registered models are not the config's: refused, not skipped
    again = run_all(plan_finetune(load_train_config(CONFIGS / "tiny.yaml", [*sets, "finetune.lr=0.5"])), cfg.ray)
    assert {o.status for o in again} == {"failed"} and all("finetune.lr: 0.001 -> 0.5" in o.error for o in again)
    # settings of other kinds of run are not this run's: a fine-tune does not depend on pretrain.lr
    other = run_all(plan_finetune(load_train_config(CONFIGS / "tiny.yaml", [*sets, "pretrain.lr=0.5"])), cfg.ray)
    assert {o.status for o in other} == {"skipped"}
    # with more epochs than it trained, a registered run resumes and registers again
    longer = plan_finetune(load_train_config(CONFIGS / "tiny.yaml", [*sets, "finetune.epochs=2"]))[:1]
    with open(Path(longer[0].run_dir) / "events.jsonl", "a") as f:  # as if killed before it registered epoch 1
        f.write(json.dumps({"event": "epoch", "epoch": 1}) + "\n")
    assert [o.status for o in run_all(longer, cfg.ray)] == ["done"]
    log = [json.loads(line) for line in (Path(longer[0].run_dir) / "events.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["resumed"]) for e in log if e["event"] == "start"] == [(0, False), (1, True)]
    # a registered run whose folder is gone cannot be checked: skipped, and the summary says why
    shutil.rmtree(specs[1].run_dir)
    gone = run_all(specs[1:2], cfg.ray)[0]
    assert gone.status == "skipped" and f"its run folder {specs[1].run_dir} is gone" in gone.note
    assert [e["event"] for e in log].count("registered") == 2
    assert [o.status for o in run_all(longer, cfg.ray)] == ["skipped"]
    # retrained into a new output folder with other settings: the old folder's cards are refused, not kept
    elsewhere = [a for s in [*sets[:2], f"output={tmp_path / 'other'}", "finetune.lr=0.01"] for a in ("--set", s)]
    assert copydet(["finetune", str(CONFIGS / "tiny.yaml"), *elsewhere]) == 1
    out = capsys.readouterr().out
    assert out.count("failed") == 4 and f"registered from run folder {specs[0].run_dir}, not from" in out


def registered_spec(tmp_path: Path, how: str = "final") -> RunSpec:
    """A fine-tuning run registered from ``tmp_path/old`` (a folder not there): its final weights,
    a best epoch's file, weights without a sidecar (as a verifier's), or a card recording no folder."""
    spec = RunSpec(kind="finetune", name="t-tiny_cnn-basic", backbone="tiny_cnn", recipe="basic",
                   run_dir=str(tmp_path / "old" / "t-tiny_cnn-basic"), registry=str(tmp_path / "registry"), seed=0,
                   data=DataSection(train=str(tmp_path)), model=ModelSection(dim=16, img_size=32))
    net = build_backbone("tiny_cnn", dim=16, img_size=32)
    if how in ("final", "best"):
        register_model(spec, net, run_card(spec, net), save_checkpoint(net, tmp_path / "b.safetensors")
                       if how == "best" else None)
        return spec
    weights = tmp_path / "registry" / f"{spec.name}.safetensors"
    weights.parent.mkdir()
    if how == "no_sidecar":
        weights.write_bytes(safetensors.torch.save(net.state_dict()))
        record_source(spec, weights)
    else:  # "unrecorded": as registered before runs recorded their folder
        save_checkpoint(net, weights)
    register(run_card(spec, net, weights=str(weights)), spec.registry)
    return spec


@pytest.mark.parametrize("how", ["final", "best", "no_sidecar"])
def test_a_card_another_run_folder_registered_is_refused_not_skipped(tmp_path, how):
    """Training into a new output folder finds the card the old folder registered: refused, naming the
    card, the folder it came from and the ways out; the card of the run's own folder, deleted since
    to save space, is skipped with a note."""
    spec = registered_spec(tmp_path, how)
    own = finished(spec)
    assert own.status == "skipped" and f"its run folder {spec.run_dir} is gone" in own.note
    new = finished(spec.model_copy(update={"run_dir": str(tmp_path / "new" / spec.name)}))
    card = tmp_path / "registry" / f"{spec.name}.json"
    assert new.status == "failed" and f"{card}: registered from run folder {spec.run_dir}, not from" in new.error
    assert "another `registry:` or `name:`, or delete the card" in new.error


def test_a_card_without_a_recorded_run_folder_is_tied_by_that_folder_only(tmp_path):
    """A card that records no run folder (registered before runs recorded it) is this run's only when
    the run's pinned folder is there: without it, it is refused rather than skipped unchecked."""
    spec = registered_spec(tmp_path, "unrecorded")
    gone = finished(spec)
    assert gone.status == "failed" and f"records no run folder, and {spec.run_dir} is not there" in gone.error
    pin = Path(spec.run_dir) / PIN
    pin.parent.mkdir(parents=True)
    pin.write_text(json.dumps({"settings": pinned_settings(spec)}))
    assert finished(spec).status == "skipped"


def test_an_empty_training_folder_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    """data.train without an image is named at start (like a missing folder), not by every run in Ray;
    an image in a sub-folder counts."""
    def no_ray(*_):
        raise AssertionError("Ray started")

    monkeypatch.setattr("jobs.commands.train.init_ray", no_ray)
    empty = tmp_path / "photos"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no photo")
    argv = ["finetune", str(CONFIGS / "tiny.yaml"), "--set", f"data.train={empty}", "--set", f"output={tmp_path}",
            "--set", f"registry={tmp_path / 'registry'}"]
    assert copydet(argv) == 2
    assert f"tiny.yaml: data.train {empty} holds no images (accepted extensions: .jpg" in capsys.readouterr().err
    assert copydet([*argv, "--address", "auto"]) == 2  # a driver on a node of the cluster (a submitted job's)
    assert f"data.train {empty} holds no images" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="Ray started"):  # Ray Client: the folder is the cluster's, not here
        copydet([*argv, "--address", "ray://head:10001"])
    Image.new("RGB", (64, 48)).save(empty / "sub" / "a.jpg")
    with pytest.raises(AssertionError, match="Ray started"):
        copydet(argv)


def test_each_training_command_names_a_planner_of_the_fanout():
    """The commands name their planner (imported when they run): each name is one of fanout's."""
    from typing import get_args

    from jobs.commands.train import Planner
    from pretrain.train import fanout

    assert {name: callable(getattr(fanout, name, None)) for name in get_args(Planner)} == {
        "plan_pretrain": True, "plan_finetune": True, "plan_verifier": True}


def test_a_fine_tuning_start_of_another_architecture_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    from core.models.checkpoint import save_checkpoint

    def no_ray(*_):
        raise AssertionError("Ray started")

    monkeypatch.setattr("jobs.commands.train.init_ray", no_ray)
    vit = save_checkpoint(build_backbone("tiny_vit"), tmp_path / "vit.safetensors")
    argv = ["finetune", str(CONFIGS / "tiny.yaml"), "--set", f"finetune.init={vit}", "--set", "backbones=[tiny_cnn]",
            "--set", f"output={tmp_path}", "--set", f"registry={tmp_path / 'registry'}"]
    assert copydet(argv) == 2
    assert f"finetune.init for tiny-tiny_cnn-basic: {vit}: no key matches the model" in capsys.readouterr().err
    cnn = save_checkpoint(build_backbone("tiny_cnn"), tmp_path / "cnn.safetensors")
    with pytest.raises(AssertionError, match="Ray started"):  # a start that fits goes on
        copydet([*argv[:3], f"finetune.init={cnn}", *argv[4:]])


def test_models_command_lists_the_registry(tmp_path, capsys):
    from core.models.registry import register
    from core.models.resolve import card_for_model

    model = build_backbone("tiny_cnn", dim=16)
    register(card_for_model(model, name="m-one", trained_on="basic", loss="triplet",
                            metrics={"micro_ap": 0.5}), tmp_path)
    assert copydet(["models", "--registry", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("name "))  # skip Ray log lines
    header, rule, row = lines[start:]
    assert header.split()[:3] == ["name", "kind", "arch"]
    assert row.split()[:8] == ["m-one", "backbone", "tiny_cnn", "16", str(model.img_size), "basic", "triplet", "0.5"]


def test_loader_workers_follow_the_epoch(photo_dir):
    """Persistent loader workers see each new epoch (shared memory), so their copies equal the
    ones made in this process for that epoch."""
    from core.models.preprocess import Preprocess
    from core.models.resolve import card_for_model
    from pretrain.data import CopyViews, make_loader, set_loader_epoch
    from pretrain.photos import LazyPhotos, PhotoFiles
    from pretrain.recipes import get_recipe

    pre = Preprocess.for_card(card_for_model(build_backbone("tiny_cnn", dim=16, img_size=32), name="m"), 32)
    photos = LazyPhotos(PhotoFiles.from_folder(photo_dir, limit=8), max_side=64)
    ds = CopyViews(photos, get_recipe("basic"), views=2, pre=pre, seed=0)
    loader = make_loader(ds, 4, num_workers=1)
    for epoch in (0, 3):
        set_loader_epoch(loader, epoch)
        batch, labels = next(iter(loader))
        assert torch.equal(batch[0], ds[int(labels[0])][0])  # ds.epoch is the same shared value
    assert ds.epoch == 3
