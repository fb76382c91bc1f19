"""`copydet tune`: synthetic split from train photos only, tuned values, a config `copydet run` accepts."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from core.contracts import CANDIDATES_SCHEMA
from core.metrics import read_ground_truth
from ensemble.fuse import fuse_models
from ensemble.tune import (
    Member,
    Ranking,
    Setting,
    held_out_maps,
    per_model_scores,
    query_fold,
    restrict,
    setting_map,
    tune_members,
)
from jobs import tune as jobs_tune
from jobs.cli import main
from jobs.commands.tune import BETA_GRID
from jobs.config import load_config
from jobs.tune import format_subsets, format_table, tuned_values, user_split
from pretrain.synthetic import SplitSpec, make_synthetic_split
from tests.conftest import synthetic_photo

REPO = Path(__file__).resolve().parent.parent

TINY = ["models.0.name=tiny_cnn", "models.0.scales=[64]", "models.0.batch_size=8", "patches.shard_size=5",
        "patches.query.preset=global", "search.k=5", "fuse.k=5"]


def _hashes(folder: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def _more_train(root: Path, n: int = 14) -> None:
    for i in range(n):
        synthetic_photo(200 + i).save(root / "train" / f"T{100 + i:03d}.jpg")


def test_tune_writes_a_config_run_accepts(ray_local, tiny_dataset, tmp_path, monkeypatch):
    _more_train(tiny_dataset)  # 20 train photos: 6 held out, 4 of the other 14 as background
    src = tmp_path / "cfg.yaml"
    src.write_text("# my config\nname: t\nmodels:\n  - name: resnet18\n"
                   f"data:\n  root: {tiny_dataset}\nsearch:\n  normalize:\n    enabled: true\n    beta: 0.3\n")
    out = tmp_path / "run"
    argv = ["tune", str(src), "--out", str(out), "--photos", "6", "--background", "4",
            *sum((["--set", s] for s in TINY), [])]
    rankings, tune_members = [], jobs_tune.tune_members
    monkeypatch.setattr(jobs_tune, "tune_members", lambda *a: rankings.append(a[-1]) or tune_members(*a))
    assert main(argv) == 0
    assert rankings == [Ranking(load_config(src, TINY).fuse.k, 0.1)]  # scored as the run demotes (the default)

    tuned_path = out / "tuned.yaml"
    text = tuned_path.read_text()
    assert text.startswith("# Tuned by `copydet tune`") and "evaluation queries and ground truth were not used" in text
    tuned = load_config(tuned_path)
    norm = tuned.search.normalize
    keys = next(line for line in text.splitlines() if line.startswith("# keys set: ")).split(": ", 1)[1]
    adopted = "search.normalize.beta" in keys
    assert adopted == ("(tuned, adopted)" in text) != (", kept (the tuned one" in text)
    assert keys.replace(" (unchanged)", "") in ("fuse.threshold",
                                                "fuse.threshold, search.normalize.enabled, search.normalize.beta")
    assert ("search.normalize.beta (unchanged)" in keys) == (adopted and norm.beta == 0.3)
    assert (norm.beta in BETA_GRID and norm.enabled == (norm.beta > 0)) if adopted else norm.beta == 0.3
    assert [(m.name, m.scales) for m in tuned.models] == [("tiny_cnn", [64])]  # --set overrides kept
    assert tuned.fuse.thresholds == {} and tuned.fuse.rule == "max"  # one member: fusion is not tuned
    assert "fuse:" in text and "threshold:" in text.split("fuse:", 1)[1]  # calibrated (or null: never reached)
    assert ("fuse.threshold none" in text) == (tuned.fuse.threshold is None)
    assert tuned.output == str(out)

    data = out / "tune" / "data"
    split_files = _hashes(data / "queries") | _hashes(data / "references") | _hashes(data / "train")
    assert not split_files & _hashes(tiny_dataset / "queries"), "an evaluation query leaked into the split"
    assert not split_files & _hashes(tiny_dataset / "references")
    assert len(list((data / "references").iterdir())) == 3 and len(list((data / "train").iterdir())) == 4
    gt = read_ground_truth(data / "ground_truth.csv")
    refs = {p.stem for p in (data / "references").iterdir()}
    assert len(gt) == 2 and {r for _, r in gt} <= refs and len(list((data / "queries").iterdir())) == 5

    # A second run reuses the split and the stage outputs and tunes to the same values.
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    assert main(argv + ["--write", str(tmp_path / "again.yaml")]) == 0
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before
    again = yaml.safe_load((tmp_path / "again.yaml").read_text())
    assert again == yaml.safe_load(text)
    assert main([*argv[:4], "--photos", "8"]) == 2  # a different split cannot reuse this folder


def test_synthetic_split_is_deterministic(tiny_dataset, tmp_path):
    spec = SplitSpec(photos=4, seed=3)
    a = make_synthetic_split(str(tiny_dataset / "train"), str(tmp_path / "a"), spec)
    b = make_synthetic_split(str(tiny_dataset / "train"), str(tmp_path / "b"), spec)
    assert Path(a.ground_truth).read_text() == Path(b.ground_truth).read_text()
    assert _hashes(Path(a.queries)) == _hashes(Path(b.queries))
    c = make_synthetic_split(str(tiny_dataset / "train"), str(tmp_path / "c"), SplitSpec(photos=4, seed=4))
    assert _hashes(Path(a.references)) != _hashes(Path(c.references))


def test_a_split_of_two_recipes_takes_them_in_turn(tiny_dataset, tmp_path):
    train = str(tiny_dataset / "train")
    made = {name: make_synthetic_split(train, str(tmp_path / name.replace("+", "_")), SplitSpec(photos=4, recipe=name))
            for name in ("heavy", "severe", "heavy+severe")}
    alone = {name: _hashes(Path(made[name].queries)) for name in ("heavy", "severe")}
    both = _hashes(Path(made["heavy+severe"].queries))
    assert len(both) == 3 and both <= alone["heavy"] | alone["severe"]
    assert both & alone["heavy"] and both & alone["severe"]
    assert Path(made["heavy+severe"].ground_truth).read_text() == Path(made["heavy"].ground_truth).read_text()
    with pytest.raises(ValueError, match="unknown recipe 'sever'"):
        make_synthetic_split(train, str(tmp_path / "bad"), SplitSpec(photos=4, recipe="heavy+sever"))


def test_a_split_skips_photos_too_small_to_edit_and_copies_a_recipe_fails_on(tmp_path, monkeypatch, caplog):
    """Held-out photos must be usable as in training (a 12 x 12 one is skipped, named); a copy the
    recipe still fails on is left out of the queries and the ground truth, and the split is made."""
    import logging

    from pretrain import synthetic
    from pretrain.recipes import RecipeError

    train = tmp_path / "train"
    train.mkdir()
    for i in range(8):
        synthetic_photo(900 + i, (64, 48)).save(train / f"T{i}.jpg")
    synthetic_photo(1, (12, 12)).save(train / "T_tiny.png")
    real = synthetic.get_recipe

    def failing_on_t3(name):
        recipe = real(name)

        def edit(image, *, key, **kw):
            if key == "T3":
                raise RecipeError(f"recipe {name!r}: op 'overlay_text' failed on a {image.size} image")
            return recipe(image, key=key, **kw)
        return edit

    monkeypatch.setattr(synthetic, "get_recipe", failing_on_t3)
    with caplog.at_level(logging.WARNING, logger="pretrain.synthetic"):
        split = make_synthetic_split(str(train), str(tmp_path / "split"), SplitSpec(photos=8, background=0))
    assert "T_tiny.png: 12 x 12 px is too small" in caplog.text
    assert f"no query from train photo {train / 'T3.jpg'}: recipe 'basic'" in caplog.text
    gt = Path(split.ground_truth).read_text().splitlines()[1:]
    assert len(gt) == 5 == len(list(Path(split.queries).iterdir()))  # 6 edits (2 copies, 4 negatives), T3's left out
    assert {row.split(",")[0] for row in gt} == {p.stem for p in Path(split.queries).iterdir()}
    assert split.train is None  # background=0: none linked


def test_user_split_refuses_the_evaluation_set(tiny_dataset, tmp_path):
    cfg = load_config(None, [f"data.root={tiny_dataset}"])
    with pytest.raises(ValueError, match="evaluation data"):
        user_split(cfg, str(tiny_dataset / "queries"), str(tiny_dataset / "ground_truth.csv"))
    shutil.copytree(tiny_dataset / "queries", tmp_path / "queries")  # a copy is the evaluation set too
    shutil.copy(tiny_dataset / "ground_truth.csv", tmp_path / "gt.csv")
    with pytest.raises(ValueError, match="4 of the 4 pairs of .*gt.csv are pairs of the config's evaluation"):
        user_split(cfg, str(tmp_path / "queries"), str(tmp_path / "gt.csv"))


def test_without_a_config_tune_takes_the_out_run_folders_own_as_its_help_says(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    data = {"references": str(tiny_dataset / "references"), "queries": str(tiny_dataset / "queries")}
    (run / "config.yaml").write_text(yaml.safe_dump({"models": [{"name": "resnet18"}], "data": data}))
    assert main(["tune", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"copydet tune: error: {run / 'config.yaml'}: no train folder to make a synthetic validation split" in err


def test_a_split_without_background_is_refused_when_the_config_normalises(tiny_dataset, tmp_path, capsys):
    """Tuned on raw scores, the threshold would not fit the run's normalised ones (it flagged no copy)."""
    argv = ["tune", "--out", str(tmp_path / "run"), "--photos", "3", "--background", "0",
            "--set", f"data.root={tiny_dataset}", "--set", "search.normalize.enabled=true"]
    assert main([argv[0], str(REPO / "configs" / "smoke.yaml"), *argv[1:]]) == 2
    assert "--background 0 leaves the split nothing to normalise against" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_member_with_too_little_background_is_not_normalised_and_says_how_much_it_needs(tmp_path, caplog):
    import logging

    import numpy as np

    from core.store import features_table, write_table
    from jobs.layout import RunDir
    run = RunDir(str(tmp_path / "run"))
    write_table(features_table(["T0"], [0], "m", 64, np.ones((1, 4), np.float32) / 2),
                f"{run.features('m@64')}/train-00000.parquet")
    write_table(CANDIDATES_SCHEMA.empty_table(), f"{run.candidates('m@64')}/query-00000.parquet")
    caplog.set_level(logging.INFO)
    assert jobs_tune.load_member(run, "m@64", 1).bias is None
    assert "m@64: 1 train descriptor(s), fewer than the 2 normalisation needs (search.normalize.neighbours=1; " \
           "2 at least); beta not tuned" in caplog.text


def _member(key: str, rows: list[tuple[str, str, float]], bias: dict[str, float]) -> Member:
    """Candidates with one patch per query, and that patch's bias."""
    cands = pa.Table.from_pylist([{"query_id": q, "query_patch": 0, "reference_id": r, "reference_patch": 0,
                                   "model": key, "score": s} for q, r, s in rows], schema=CANDIDATES_SCHEMA)
    return Member(key, cands, pa.table({"image_id": list(bias), "patch_id": pa.array([0] * len(bias), pa.int32()),
                                        "bias": pa.array(list(bias.values()), pa.float32())}))


def test_tune_members_finds_known_beta_and_thresholds():
    # q0, q1 are copies of r0, r1 (raw 0.70, 0.65); q2 is a texture close to the training set
    # (bias 0.9) that scores 0.80 on r2. Raw, q2 ranks first: μAP < 1. With beta >= 0.25 its
    # score drops below the copies' (bias 0.1): μAP 1; the smallest such beta wins.
    # Member B alone ranks a wrong pair (q0, r9) first; completeness with A's threshold above
    # 0.6 and B's above 0.95 drops it, so the tuned ensemble reaches μAP 1 again.
    gt = [("q0", "r0"), ("q1", "r1")]
    bias = {"q0": 0.1, "q1": 0.1, "q2": 0.9}
    a = _member("A", [("q0", "r0", 0.70), ("q1", "r1", 0.65), ("q2", "r2", 0.80)], bias)
    b = _member("B", [("q0", "r9", 0.99), ("q0", "r0", 0.50), ("q1", "r1", 0.40), ("q2", "r2", 0.10)],
                {k: 0.0 for k in bias})
    one = tune_members([a], gt, Setting(0.0, "max", {}), [0.0, 0.25, 1.0], Ranking(5))
    assert one.after.beta == 0.25 and one.map_after == pytest.approx(1.0) and one.map_before < 1.0
    assert not one.tuned_fusion
    two = tune_members([a, b], gt, Setting(0.0, "max", {}), [0.0, 0.25, 1.0], Ranking(5))
    assert two.tuned_fusion and two.map_after == pytest.approx(1.0) and two.map_before < 1.0
    fused = fuse_models(per_model_scores([a, b], two.after.beta), two.after.thresholds, two.after.rule)
    pairs = set(zip(fused.column("query_id").to_pylist(), fused.column("reference_id").to_pylist()))
    assert ("q0", "r9") not in pairs and {("q0", "r0"), ("q1", "r1")} <= pairs
    # every subset's max, at the tuned beta: A alone ranks the copies first, B's wrong pair spoils A + B
    assert two.subsets == {("A",): pytest.approx(1.0), ("B",): pytest.approx(two.members_after["B"]),
                           ("A", "B"): pytest.approx(setting_map([a, b], gt, Setting(two.after.beta, "max", {}),
                                                                 Ranking(5)))}
    assert two.subsets[("A", "B")] < 1.0 and one.subsets == {}
    lines = format_subsets(two).splitlines()[1:]
    assert lines[0] == f"  {1.0:.4f}  A" and sorted(lines, reverse=True) == lines and len(lines) == 3


def test_held_out_maps_score_each_fold_with_the_setting_tuned_on_the_other():
    """Copy c0 scores 0.80 with a high bias (0.9), the non-copy n0 0.60 with none: their fold wants
    beta 0. In the other fold the non-copy n1 has the bias (0.79) and the copy c1 not (0.61): beta 1.
    On the whole split beta 0 ties beta 1 (μAP 5/6). Held out, each fold gets the other's beta, which
    ranks its non-copy first: μAP 1/2 in both; as given (beta 0): 1 and 1/2."""
    names = [f"q{i}" for i in range(100)]
    (c0, n0), (c1, n1) = ([q for q in names if query_fold(q, 2) == f][:2] for f in (0, 1))
    gt = [(c0, "r0"), (c1, "r1")]
    a = _member("A", [(c0, "r0", 0.80), (n0, "r9", 0.60), (c1, "r1", 0.61), (n1, "r8", 0.79)],
                {c0: 0.9, n0: 0.0, c1: 0.0, n1: 0.9})
    result = tune_members([a], gt, Setting(0.0, "max", {}), [0.0, 1.0], Ranking(5))
    assert result.map_after == pytest.approx(5 / 6)
    assert result.held_out == pytest.approx((0.75, 0.5))
    assert "on held-out queries (2 folds)  0.7500  0.5000" in format_table(result)
    assert not result.adopted and result.chosen == result.before  # fitted to the split, not learnt
    assert tuned_values(result) == {} and "kept the given setting" in format_table(result)
    c2 = [q for q in names if query_fold(q, 2) == 0][2]  # a copy no member retrieved: missed in its fold
    with_c2 = held_out_maps([a], [*gt, (c2, "r2")], Setting(0.0, "max", {}), [0.0, 1.0], Ranking(5))
    assert with_c2 == pytest.approx(((1 / 2 + 1 / 2) / 2, (1 / 4 + 1 / 2) / 2))
    one_fold = [restrict(a, {c0, n0})]  # the other fold has no copy to tune on
    assert held_out_maps(one_fold, [(c0, "r0")], Setting(0.0, "max", {}), [0.0, 1.0], Ranking(5)) is None
    few = tune_members(one_fold, [(c0, "r0")], Setting(0.0, "max", {}), [0.0, 1.0], Ranking(5))
    assert not few.adopted and few.chosen == few.before  # no held-out check: the given setting stays
    assert "too few copies to check the tuned one" in format_table(few)


def test_matched_split_sizes_keep_the_reference_to_background_ratio():
    from jobs.commands.tune import matched_sizes

    photos, background = matched_sizes(920, 925)  # minidisc: references ~ train
    assert (photos, background) == (614, 305)
    assert abs((photos // 2) / background - 925 / 920) < 0.01 and photos + background <= 920
    photos, background = matched_sizes(20, 8)  # fewer references than train photos
    assert (photos // 2) / background == pytest.approx(8 / 20) and photos + background <= 20
    assert matched_sizes(10**6, 10**6) == (1200, 600)  # capped: a split that runs in minutes
    with pytest.raises(ValueError, match="need >= 3 train photos"):
        matched_sizes(2, 5)
