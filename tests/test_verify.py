"""Keypoint verification: a rotated crop of an image verifies, an unrelated image does not."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from ensemble.keypoints import KEYPOINT_METHODS, best_matches, describe, inliers, l2_matches, matches, mirror_view, \
    root_sift
from ensemble.verify import KeypointScorer, verify_pairs


def draw_shapes(img: Image.Image, rng: np.random.Generator, n: int, sides: tuple[int, int], margin: int) -> Image.Image:
    """``n`` random rectangles and ellipses of ``sides`` (low, high) px drawn on ``img``."""
    d = ImageDraw.Draw(img)
    for _ in range(n):
        x, y = rng.integers(0, img.width - margin, 2)
        w, h = rng.integers(*sides, 2)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (d.rectangle if rng.random() < 0.5 else d.ellipse)([int(x), int(y), int(x + w), int(y + h)], fill=colour)
    return img


def textured(seed: int, size: int = 256) -> Image.Image:
    """Many random shapes on a noisy background: lots of distinctive corners."""
    rng = np.random.default_rng(seed)
    return draw_shapes(Image.fromarray(rng.integers(0, 40, (size, size, 3), dtype=np.uint8) + np.uint8(100)),
                       rng, 60, (6, 40), 20)


def rotated_crop(img: Image.Image) -> Image.Image:
    return img.rotate(20, resample=Image.Resampling.BICUBIC).crop((40, 30, 220, 230)).resize((150, 166))


@pytest.mark.parametrize("method", sorted(KEYPOINT_METHODS))
def test_rotated_crop_has_many_inliers_unrelated_few(method):
    a = textured(0)
    assert inliers(a, rotated_crop(a), method=method) >= 20
    assert inliers(a, textured(1), method=method) <= 8


def test_max_side_limits_the_image_and_blank_images_give_zero():
    big = textured(2, size=400)
    pts = describe(big, max_side=128).points
    assert len(pts) and pts.max() < 128
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    assert inliers(blank, big) == 0
    with pytest.raises(ValueError, match="unknown keypoint method 'surf'"):
        inliers(big, big, method="surf")


def test_min_side_enlarges_thumbnails_until_their_copies_verify():
    """A 24-px thumbnail has two keypoints; enlarged to 256 px it confirms against its original."""
    ref = textured(3)
    thumb, unrelated = ref.resize((24, 24), Image.Resampling.BILINEAR), textured(4).resize((24, 24))
    assert describe(thumb, min_side=256).size == (256, 256) and describe(ref, min_side=128).size == (256, 256)
    assert describe(thumb, max_side=128, min_side=256).size == (128, 128)
    plain, enlarged = KeypointScorer("rootsift", mirror=False, min_side=0), KeypointScorer("rootsift", mirror=False)
    assert plain.compare(plain.describe_query(thumb), [plain.describe(ref)])[0][0] < 8
    assert enlarged.compare(enlarged.describe_query(thumb), [enlarged.describe(ref)])[0][0] >= 8
    assert enlarged.compare(enlarged.describe_query(unrelated), [enlarged.describe(ref)])[0][0] < 8


def grainy_shapes(seed: int, size: int = 512) -> Image.Image:
    """Large shapes under strong grain: the grain's keypoints fill the detector's budget (1000)."""
    rng = np.random.default_rng(seed)
    img = draw_shapes(Image.new("RGB", (size, size), (120, 120, 120)), rng, 40, (32, 140), 40)
    grain = rng.normal(0, 60, (size, size, 1))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("method", sorted(KEYPOINT_METHODS))
def test_a_blurred_copy_matches_better_at_the_coarse_side(method):
    """Blurred, a copy keeps the shapes and loses the grain whose keypoints crowd the original's
    budget: with both images also shrunk to ``coarse_side`` the better level has many more inliers;
    an unrelated image still none. Inlier pairs come in fractions of the images' sides."""
    from PIL import ImageFilter

    ref = grainy_shapes(7)
    copy, unrelated = (im.filter(ImageFilter.GaussianBlur(5)) for im in (ref, grainy_shapes(8)))
    fine, both = KeypointScorer(method, mirror=False), KeypointScorer(method, mirror=False, coarse_side=96)
    plain = fine.compare(fine.describe_query(copy), [fine.describe(ref)])[0][0]
    pairs, (n, room) = both.check(both.describe_query(copy), both.describe(ref))
    assert n >= plain + 8 and room == min(len(describe(im, method).points) for im in (copy, ref))
    assert len(pairs) == n and 0 <= pairs.min() and pairs.max() <= 1
    assert np.abs(pairs[:, :2] - pairs[:, 2:]).max() < 0.02  # a copy in place: the same spots of both
    assert both.compare(both.describe_query(unrelated), [both.describe(ref)])[0][0] < 8


def test_l2_matches_are_opencvs_mutual_ratio_test_matches():
    """One distance matrix gives the pairs of two OpenCV brute-force passes (knn a->b, nn b->a)."""
    import cv2

    a, b = describe(textured(8)).descriptors, describe(rotated_crop(textured(8))).descriptors
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    back = {m.queryIdx: m.trainIdx for m in matcher.match(b, a)}
    want = {(m[0].queryIdx, m[0].trainIdx) for m in matcher.knnMatch(a, b, k=2)
            if m[0].distance < 0.75 * m[1].distance and back[m[0].trainIdx] == m[0].queryIdx}
    ia, ib = l2_matches(a, b, 0.75)
    assert len(want) >= 20 and set(zip(ia.tolist(), ib.tolist())) == want


@pytest.mark.parametrize("method", sorted(KEYPOINT_METHODS))
@pytest.mark.parametrize("flip", [Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM])
def test_a_flipped_copy_verifies_only_through_the_querys_mirror(flip, method):
    """Keypoint descriptors are not mirror-invariant; a vertical flip is a mirror turned 180 degrees."""
    ref = textured(9)
    query = rotated_crop(ref).transpose(flip)
    plain, mirrored = KeypointScorer(method, mirror=False), KeypointScorer(method, mirror=True)
    r = plain.describe(ref)
    assert plain.compare(plain.describe_query(query), [r])[0][0] <= 8
    assert mirrored.compare(mirrored.describe_query(query), [r])[0][0] >= 20
    assert mirrored.compare(mirrored.describe_query(textured(10)), [r])[0][0] <= 8


@pytest.mark.parametrize("method", ["sift", "rootsift"])
def test_sift_mirror_view_matches_the_description_of_the_flipped_image(method):
    """Permuted descriptors at mirrored points stand in for describing the flipped image: most
    of them match its keypoints, at the same places (an identity homography)."""
    img = textured(12)
    view = mirror_view(describe(img, method), method)
    h, pairs = matches(view, describe(img, method, mirrored=True), method)
    assert view.mirrored and len(pairs) >= 0.5 * len(view.points)
    h = h / h[2, 2]
    np.testing.assert_allclose(h[:, :2], np.eye(3)[:, :2], atol=0.02)
    np.testing.assert_allclose(h[:2, 2], 0, atol=1.0)  # SIFT's doubled first octave: half-pixel shifts


def test_orb_has_no_mirror_permutation_and_describes_the_flipped_image():
    img = textured(12)
    with pytest.raises(ValueError, match="orb: no mirror permutation"):
        mirror_view(describe(img, "orb"), "orb")
    views = KeypointScorer("orb").describe_query(img)
    assert views[1].mirrored and np.array_equal(views[1].codes, describe(img, "orb", mirrored=True).codes)


def test_rootsift_is_the_square_root_of_the_l1_normalised_sift_descriptor():
    """Unit L2 rows whose squares are SIFT's histogram as proportions: distances compare the
    histograms by the Hellinger kernel."""
    img = textured(13)
    sift, root = describe(img, "sift"), describe(img, "rootsift")
    np.testing.assert_array_equal(sift.points, root.points)
    np.testing.assert_allclose(np.linalg.norm(root.descriptors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(root.descriptors**2, sift.descriptors / sift.descriptors.sum(1, keepdims=True),
                               atol=1e-6)
    assert root_sift(np.zeros((2, 128), np.uint8)).sum() == 0  # a blank descriptor stays blank, not NaN


def test_mirrored_inliers_are_given_in_the_querys_own_frame():
    """A left-right flip of the reference itself: each inlier at (x, y) in the query sits at
    (w - 1 - x, y) in the reference."""
    ref = textured(11)
    query = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    views = KeypointScorer().describe_query(query)
    _, pairs = best_matches(views, describe(ref))
    assert len(pairs) >= 20
    offset = np.abs(pairs[:, 2:] - np.c_[ref.width - 1 - pairs[:, 0], pairs[:, 1]])
    assert np.median(offset) < 0.5 and offset.max() <= 5.0  # RANSAC's reprojection tolerance


def test_verify_pairs_counts_top_k_per_query(tmp_path):
    a, b = textured(3), textured(4)
    files = {"q0": rotated_crop(a), "q1": rotated_crop(b), "ra": a, "rb": b}
    paths = {}
    for name, img in files.items():
        img.save(tmp_path / f"{name}.png")
        paths[name] = str(tmp_path / f"{name}.png")
    pairs = pa.table({"query_id": ["q0", "q0", "q1", "q1"], "reference_id": ["rb", "ra", "ra", "rb"],
                      "score": pa.array([0.9, 0.5, 0.8, 0.7], pa.float32())})
    opened = []

    def load(path: str) -> Image.Image:
        opened.append(path)
        return Image.open(path).convert("RGB")

    queries = {k: v for k, v in paths.items() if k.startswith("q")}
    refs = {k: v for k, v in paths.items() if k.startswith("r")}
    out = verify_pairs(pairs, queries, refs, top_k=1, load=load)
    assert out.column_names == ["query_id", "reference_id", "score", "inliers", "keypoints"]
    counts = out.column("inliers").to_pylist()
    kps = out.column("keypoints").to_pylist()
    assert kps[1] is None and kps[0] == min(len(describe(files["q0"]).points), len(describe(files["rb"]).points))
    assert counts[1] is None and counts[3] is None  # not in the top 1 of their query
    assert counts[0] <= 8 and counts[2] <= 8  # the top-scored pairs are not copies
    full = verify_pairs(pairs, queries, refs, top_k=2, load=load).column("inliers").to_pylist()
    assert full[1] >= 20 and full[3] >= 20 and full[0] <= 8
    assert len(opened) == 4 + 4  # each image decoded once per call
    with pytest.raises(ValueError, match="no query image path for id.*q1"):
        verify_pairs(pairs, {"q0": paths["q0"]}, refs, top_k=1, load=load)


def test_a_query_and_a_reference_may_share_an_id(tmp_path):
    """Each side is read through its own split's map: X0001 the query is not X0001 the reference."""
    a = textured(6)
    a.save(tmp_path / "ref.png")
    rotated_crop(a).save(tmp_path / "query.png")
    textured(7).save(tmp_path / "other.png")
    pairs = pa.table({"query_id": ["X0001"], "reference_id": ["X0001"], "score": pa.array([0.5], pa.float32())})
    load = lambda p: Image.open(p).convert("RGB")  # noqa: E731
    copy = verify_pairs(pairs, {"X0001": str(tmp_path / "query.png")}, {"X0001": str(tmp_path / "ref.png")},
                        top_k=1, load=load)
    unrelated = verify_pairs(pairs, {"X0001": str(tmp_path / "query.png")}, {"X0001": str(tmp_path / "other.png")},
                             top_k=1, load=load)
    assert copy.column("inliers")[0].as_py() >= 20 and unrelated.column("inliers")[0].as_py() <= 8


def test_verify_pairs_reads_files_with_the_pipeline_decoder(tmp_path):
    from core.imageio import load_rgb

    a = textured(5)
    a.save(tmp_path / "r.png")
    rotated_crop(a).save(tmp_path / "q.jpg", quality=95)
    pairs = pa.table({"query_id": ["q"], "reference_id": ["r"], "score": pa.array([0.5], pa.float32())})
    out = verify_pairs(pairs, {"q": str(tmp_path / "q.jpg")}, {"r": str(tmp_path / "r.png")}, top_k=1,
                       load=load_rgb)
    assert out.column("inliers")[0].as_py() >= 20


def test_a_smaller_top_k_reuses_the_cache_and_gives_no_bonus_past_it(tmp_path):
    """Both pairs of q0 were verified at top_k 2 (40 inliers each); at top_k 1 only the best may rise."""
    from core.settings import pin_settings
    from core.store import join, write_table
    from jobs.config import load_config
    from jobs.layout import RunDir
    from jobs.stages.verify import Pass, check_passes, keypoint_settings, rescored

    cfg = load_config(None, [f"output={tmp_path}", "verify.enabled=true", "verify.top_k=1", "verify.min_inliers=0",
                             "verify.saturate=10"])
    run = RunDir(str(tmp_path))
    name = cfg.verify.method  # the default keypoint scorer
    folder = join(run.verify, name)
    pin_settings(folder, keypoint_settings(name, cfg), f"verify ({name})")
    write_table(pa.table({"query_id": ["q0", "q0"], "reference_id": ["r0", "r1"],
                          "inliers": pa.array([40, 40], pa.int32()), "keypoints": pa.array([500, 500], pa.int32())}),
                join(folder, "part-00000.parquet"))
    fused = pa.table({"query_id": ["q0", "q0"], "reference_id": ["r0", "r1"],
                      "score": pa.array([0.5, 0.4], pa.float32())})
    check_passes(cfg, run, [Pass(fused, 1)])  # all cached: no Ray task runs
    out = rescored(cfg, run, Pass(fused, 1))
    scores = dict(zip(out.column("reference_id").to_pylist(), out.column("score").to_pylist()))
    assert scores == {"r0": pytest.approx(0.5 + cfg.verify.confirm + cfg.verify.weight), "r1": pytest.approx(0.4)}


def test_silence_counts_against_a_pair_in_proportion_to_its_keypoints():
    """Below min_inliers a checked pair loses ``penalty`` times the smaller image's keypoints over
    ``penalty_keypoints`` (at most 1): a flat crop's silence says little; no check, no penalty."""
    from jobs.config import load_config
    from jobs.stages.verify import inlier_bonus

    cfg = load_config(None, ["verify.min_inliers=8", "verify.saturate=40", "verify.weight=0.5",
                             "verify.penalty=0.1", "verify.penalty_keypoints=400", "verify.confirm=0"]).verify
    cols = {"inliers": np.array([40.0, 24.0, 5.0, 5.0, 0.0, np.nan]),
            "keypoints": np.array([900.0, 50.0, 900.0, 100.0, 0.0, np.nan])}
    np.testing.assert_allclose(inlier_bonus(cols, cfg), [0.5, 0.25, -0.1, -0.025, 0.0, 0.0])
    off = cfg.model_copy(update={"penalty": 0.0})
    np.testing.assert_allclose(inlier_bonus(cols, off), [0.5, 0.25, 0.0, 0.0, 0.0, 0.0])


def test_a_confirmed_pair_gains_the_confirm_step_at_once():
    """``confirm`` is added from ``min_inliers`` inliers on, below the linear rise; a pair with
    fewer inliers or none checked gains nothing from it (even with ``min_inliers`` 0)."""
    from jobs.config import load_config
    from jobs.stages.verify import inlier_bonus

    cfg = load_config(None, ["verify.min_inliers=8", "verify.saturate=40", "verify.weight=0.5",
                             "verify.penalty=0", "verify.confirm=0.1"]).verify
    cols = {"inliers": np.array([40.0, 8.0, 7.0, np.nan]), "keypoints": np.array([900.0, 900.0, 900.0, np.nan])}
    np.testing.assert_allclose(inlier_bonus(cols, cfg), [0.6, 0.1, 0.0, 0.0])
    anything = cfg.model_copy(update={"min_inliers": 0})
    assert inlier_bonus(cols, anything)[-1] == 0.0


def test_decoys_are_never_verified_deeper_than_the_predictions():
    """A decoy past ``top_k`` would be penalised where a non-copy prediction keeps its score, and
    the threshold would trust scores it should not."""
    from jobs.config import VerifyConfig
    from jobs.stages.verify import decoy_depth

    assert decoy_depth(VerifyConfig(top_k=5, decoy_top_k=2)) == 2
    assert decoy_depth(VerifyConfig(top_k=1, decoy_top_k=2)) == 1


def test_min_side_and_coarse_side_are_pinned_and_reach_the_scorer():
    from jobs.config import load_config
    from jobs.stages.verify import keypoint_settings, scorer_for

    cfg = load_config(None, ["verify.min_side=128"])
    assert keypoint_settings("rootsift", cfg)["min_side"] == 128 and scorer_for("rootsift", cfg).min_side == 128
    assert "coarse_side" not in keypoint_settings("rootsift", cfg)  # off: caches made before it stay valid
    cfg = load_config(None, ["verify.coarse_side=128"])
    assert keypoint_settings("rootsift", cfg)["coarse_side"] == 128 and scorer_for("rootsift", cfg).coarse_side == 128


def test_a_scorer_with_nothing_cached_is_named(tmp_path):
    """The bench scripts read a scorer's cache of a run: one never verified with it was an
    ArrowInvalid ("Must pass at least one table")."""
    from jobs.layout import RunDir
    from jobs.stages.verify import read_cache

    with pytest.raises(FileNotFoundError, match=r"verify.parquet/learned: no pair scored by 'learned' yet"):
        read_cache(RunDir(str(tmp_path)), "learned")
