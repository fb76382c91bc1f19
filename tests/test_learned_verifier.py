"""copydet's learned verifier: trains a couple of steps on synthetic photos, registers as a
``verifier`` card with safetensors weights, reloads to the same outputs, and verifies in a
tiny pipeline (``verify.method: learned`` and ``learned+rootsift``)."""
from __future__ import annotations

import csv
import json
import shutil
import typing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from safetensors.torch import load_file

from core.models.cards import RegistryError
from core.models.registry import load_card, register
from core.models.verifier import (
    VerifierSpec,
    build_net,
    load_verifier,
    region_tokens,
    save_verifier,
)
from core.settings import SettingsChanged
from core.store import join, read_table, write_table
from ensemble.verify import KEYPOINT_COLUMNS
from jobs.config import VerifyConfig, load_config
from jobs.layout import RunDir
from jobs.pipeline import run_stages
from jobs.stages.verify import VERIFY_METHODS, inlier_bonus
from pretrain.pairs import make_pair_validation, validate_pairs, whole_image_cosine
from pretrain.train.fanout import plan_verifier
from pretrain.train.launch import fit_local
from pretrain.train_config import load_train_config
from tests.conftest import synthetic_photo

TINY_VERIFIER = {
    "tokens": "tiny_cnn", "miner": "tiny_cnn", "miner_scale": 32, "scale": 32, "regions": "grid6",
    "width": 16, "layers": 1, "heads": 2, "ff": 32, "epochs": 2, "photos_per_batch": 4, "steps_per_epoch": 2,
}
TINY_PIPELINE = ["models.0.name=resnet18", "models.0.scales=[64]", "models.0.batch_size=8", "patches.shard_size=5",
                 "search.k=5", "fuse.k=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny verifier trained on 14 synthetic photos (4 + 2 held aside), registered."""
    root = tmp_path_factory.mktemp("verifier")
    photos = root / "photos"
    photos.mkdir()
    for i in range(14):
        synthetic_photo(500 + i).save(photos / f"P{i:03d}.jpg")
    cfg = {"name": "tiny", "output": str(root / "runs"), "registry": str(root / "models"), "seed": 0,
           "recipes": ["basic", "overlay_text"],
           "data": {"train": str(photos), "val_photos": 4, "val_distractors": 2, "max_side": 64},
           "ray": {"launcher": "inline"}, "verifier": TINY_VERIFIER}
    (root / "v.yaml").write_text(yaml.safe_dump(cfg))
    spec = plan_verifier(load_train_config(root / "v.yaml"))[0]
    metrics = fit_local(spec)
    return spec, metrics


def test_training_registers_a_verifier_card_that_reloads_to_equal_outputs(trained):
    spec, metrics = trained
    assert spec.name == "tiny-verifier" and metrics["epoch"] == 1 and np.isfinite(metrics["loss"])
    assert 0.0 <= metrics["micro_ap"] <= 1.0
    records = [json.loads(line) for line in open(join(spec.run_dir, "events.jsonl"))]
    events = [r["event"] for r in records]
    assert events[-1] == "registered" and events.count("epoch") == 2
    assert 0.0 <= records[events.index("described")]["val_whole_image_micro_ap"] <= 1.0  # the baseline
    # every training photo's tokens and neighbours are kept in the run folder, memory-mapped, for a resume
    photos = records[events.index("described")]["photos"]
    tokens, near = (np.load(Path(spec.run_dir) / f, mmap_mode="r") for f in ("tokens.npy", "neighbours.npy"))
    assert tokens.shape[:2] == (photos, 6) and near.shape == (photos, 5) and (near != np.arange(photos)[:, None]).all()
    card = load_card("tiny-verifier", spec.registry)
    assert card.kind == "verifier" and card.weights.endswith(".safetensors") and card.train_time_s > 0
    assert card.build["tokens"] == "tiny_cnn" and "micro_ap" in card.metrics

    v1, v2 = load_verifier("tiny-verifier", spec.registry), load_verifier("tiny-verifier", spec.registry)
    a, b, c = (synthetic_photo(s, size=(80, 64)) for s in (1, 2, 3))
    tokens = [v1.describe(im) for im in (a, b, c)]
    assert tokens[0].shape == (6, v1.tokens.dim)
    p1 = v1.score(tokens[0], tokens[1:])
    assert p1.shape == (2,) and ((0 <= p1) & (p1 <= 1)).all()
    np.testing.assert_array_equal(p1, v2.score(v2.describe(a), [v2.describe(b), v2.describe(c)]))


def test_saved_weights_round_trip_and_bad_cards_are_refused(trained, tmp_path):
    spec, _ = trained
    arch = VerifierSpec(tokens="tiny_cnn", scale=32, regions="grid6", width=16, layers=1, heads=2, ff=32)
    net = build_net(arch, region_tokens(arch).dim, seed=3).eval()
    save_verifier(net, tmp_path / "w.safetensors")
    again = build_net(arch, region_tokens(arch).dim, seed=4).eval()
    again.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    q = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 6, region_tokens(arch).dim)).astype(np.float32))
    with torch.no_grad():
        np.testing.assert_array_equal(net(q, q.flip(0)).numpy(), again(q, q.flip(0)).numpy())
    with pytest.raises(RegistryError, match="is a backbone, not a verifier"):
        load_verifier("tiny_cnn", spec.registry)
    with pytest.raises(ValueError, match="regions: unknown region set 'nope'"):
        VerifierSpec(tokens="tiny_cnn", regions="nope")
    with pytest.raises(ValueError, match=r"heads \(3\) must divide width \(16\)"):
        VerifierSpec(tokens="tiny_cnn", width=16, heads=3)


def test_a_token_or_miner_model_that_does_not_resolve_is_refused_before_training(trained):
    spec, _ = trained
    config = Path(spec.run_dir).parent.parent / "v.yaml"
    for key in ("tokens", "miner"):
        with pytest.raises(RegistryError, match=f"verifier.{key}: cannot resolve model 'nosuch'"):
            plan_verifier(load_train_config(config, [f"verifier.{key}=nosuch"]))


def test_validation_pairs_leave_out_photos_that_do_not_decode(tmp_path):
    """A held-aside photo that does not decode is left out, not replaced by another held-aside
    photo (which would give one query id twice and refuse the evaluation)."""
    from core.models.encoders import load_encoder
    from pretrain.photos import LazyPhotos, PhotoFiles
    from pretrain.recipes import get_recipe

    def photos(name: str, seeds: range, bad: str) -> LazyPhotos:
        folder = tmp_path / name
        folder.mkdir()
        for i in seeds:
            synthetic_photo(700 + i).save(folder / f"{name}{i}.jpg")
        (folder / bad).write_bytes(b"not a jpeg")
        ids = sorted(p.stem for p in folder.iterdir())
        return LazyPhotos(PhotoFiles(ids, [str(folder / f"{i}.jpg") for i in ids]), max_side=64)

    refs, distractors = photos("R", range(5), "R9.jpg"), photos("D", range(10, 12), "D9.jpg")
    arch = VerifierSpec(tokens="tiny_cnn", scale=32, regions="grid6", width=16, layers=1, heads=2, ff=32)
    val = make_pair_validation(refs, distractors, [get_recipe("basic")], region_tokens(arch),
                               load_encoder("tiny_cnn", 32), k=3)
    assert val.reference_ids == [f"R{i}" for i in range(5)]
    assert val.query_ids == [f"Q-R{i}" for i in range(5)] + ["Q-D10", "Q-D11"]
    assert val.ground_truth == [(f"Q-R{i}", f"R{i}") for i in range(5)]
    assert [val.reference_ids[row[0]] for row in val.candidates[:5]] == val.reference_ids  # own original first
    assert 0 <= validate_pairs(val, whole_image_cosine).micro_ap <= 1  # evaluates: no repeated query id


def test_config_methods_match_the_stage_registry():
    assert set(typing.get_args(VerifyConfig.model_fields["method"].annotation)) == set(VERIFY_METHODS)


def test_the_learned_verifier_given_gpus_asks_each_task_for_them_and_runs_there(ray_local, trained, tmp_path,
                                                                                monkeypatch):
    """verify.learned.num_gpus above 0: its describe tasks ask Ray for the GPU and build the verifier
    on it (here asked for; none seen), with the cache's settings unchanged; keypoint tasks stay on
    the CPU. The stage refuses it on a cluster without GPUs (tasks would wait for ever)."""
    from jobs.stages import verify as stage
    spec, _ = trained
    asked, sent = [], []
    monkeypatch.setattr(stage, "pick_device", lambda use_gpu: asked.append(use_gpu) or "cpu")
    monkeypatch.setattr(stage, "run_tasks", lambda fn, calls, desc, options=None:
                        sent.append(options) or [fn(*call) for call in calls])
    base = [f"output={tmp_path}", f"registry={spec.registry}", "verify.method=learned+rootsift",
            "verify.learned.model=tiny-verifier"]
    cpu, gpu = (stage.scorer_jobs(load_config(None, [*base, *more])) for more in ([], ["verify.learned.num_gpus=1"]))
    assert {n: j.settings for n, j in cpu.items()} == {n: j.settings for n, j in gpu.items()}
    run = RunDir(str(tmp_path))
    synthetic_photo(1).save(tmp_path / "q.jpg")
    write_table(pa.table({"image_id": ["q"], "path": [str(tmp_path / "q.jpg")], "split": ["query"]}),
                join(run.manifest, "query-00000.parquet"))
    for name in ("learned", "rootsift"):
        stage.describe_missing(name, gpu[name], run, "query", {"q"}, per_task=4)
    assert sent == [{"num_gpus": 1.0}, {}] and asked == [True, False]
    with pytest.raises(RuntimeError, match="verify.learned.num_gpus is 1 but the Ray cluster has no GPUs"):
        stage.check_passes(load_config(None, [*base, "verify.learned.num_gpus=1"]), run, [])
    stage.check_passes(load_config(None, base), run, [])  # on the CPU: nothing to do, nothing refused


def test_learned_verification_in_a_tiny_pipeline(ray_local, trained, tiny_dataset, tmp_path):
    spec, _ = trained
    out = tmp_path / "run"
    base = [f"data.root={tiny_dataset}", f"output={out}", f"registry={spec.registry}", *TINY_PIPELINE,
            "verify.enabled=true", "verify.top_k=2", "verify.learned.model=tiny-verifier", "verify.learned.floor=0",
            "verify.learned.weight=0.5", "fuse.demote_others=0"]  # the bonus alone
    run_stages(load_config(None, base), ["manifest", "patch", "extract", "search", "fuse"])
    run = RunDir(str(out))
    fused = {(r["query_id"], r["reference_id"]): r["score"] for r in read_table(run.fused).to_pylist()}

    run_stages(load_config(None, [*base, "verify.method=learned"]), ["verify"])
    probs = read_table(join(run.verify, "learned"))
    per_query = {}
    for q, _ in fused:
        per_query[q] = per_query.get(q, 0) + 1
    assert probs.num_rows == sum(min(2, n) for n in per_query.values())
    by_pair = {(r["query_id"], r["reference_id"]): r["copy_prob"] for r in probs.to_pylist()}
    preds = {(r["query_id"], r["reference_id"]): float(r["score"]) for r in csv.DictReader(open(run.predictions))}
    for pair, p in by_pair.items():  # floor 0, weight 0.5: the bonus is p / 2
        assert preds[pair] == pytest.approx(fused[pair] + 0.5 * p, abs=1e-5)

    # learned+rootsift reuses the learned cache and adds the rootsift one; a second run changes nothing
    both = load_config(None, [*base, "verify.method=learned+rootsift", "verify.combine=sum"])
    run_stages(both, ["verify"])
    assert read_table(join(run.verify, "learned")).num_rows == probs.num_rows
    keypoints = read_table(join(run.verify, "rootsift")).to_pylist()
    assert len(keypoints) == probs.num_rows
    preds = {(r["query_id"], r["reference_id"]): float(r["score"]) for r in csv.DictReader(open(run.predictions))}
    for r in keypoints:  # combine sum: the learned bonus plus the keypoint bonus
        pair = (r["query_id"], r["reference_id"])
        sift = inlier_bonus({c: np.array([r[c]], float) for c in KEYPOINT_COLUMNS}, both.verify)[0]
        assert preds[pair] == pytest.approx(fused[pair] + 0.5 * by_pair[pair] + sift, abs=1e-5)
    once = open(run.predictions).read()
    run_stages(both, ["verify"])
    assert open(run.predictions).read() == once

    # the cache is pinned to the verifier's weights: a changed file is refused, a re-registered one
    # does not reuse the cache
    card = load_card("tiny-verifier", spec.registry)
    original = open(card.weights, "rb").read()
    learned = load_config(None, [*base, "verify.method=learned"])
    try:
        with open(card.weights, "r+b") as f:
            f.seek(-4, 2)
            f.write(b"\0\0\0\0")
        with pytest.raises(RegistryError, match="changed since the card was written"):
            run_stages(learned, ["verify"])
        register(card, spec.registry)
        with pytest.raises(SettingsChanged, match="weights_sha256"):
            run_stages(learned, ["verify"])
    finally:
        open(card.weights, "wb").write(original)
        register(card, spec.registry)
    # a model that is not a verifier is refused before the run starts, pinning nothing for next time
    shutil.rmtree(join(run.verify, "learned"))
    with pytest.raises(RegistryError, match="'tiny_cnn' is a backbone, not a verifier"):
        run_stages(load_config(None, [*base, "verify.method=learned", "verify.learned.model=tiny_cnn"]), ["verify"])
    assert not Path(join(run.verify, "learned")).exists()
    with pytest.raises(RegistryError, match="run `copydet train-verifier configs/train/verifier.yaml`"):
        run_stages(load_config(None, [*base, "verify.method=learned", "verify.learned.model=copydet-verifier"]),
                   ["verify"])
