"""The target-decoy estimate of the is-copy threshold (ensemble.decoys)."""
import numpy as np
import pytest

from ensemble.decoys import decoy_hits, estimate_threshold, fold_factor, fold_of, q_at, q_curve, q_values


def test_folds_are_stable_and_in_range():
    ids = [f"T{i:05d}" for i in range(1000)]
    folds = fold_of(ids, 5)
    assert folds.min() == 0 and folds.max() == 4 and np.array_equal(folds, fold_of(list(ids), 5))
    assert np.bincount(folds).min() > 150  # a hash, not a prefix: every fold gets its share
    assert fold_of(np.array([["T00001", "T00002"]], object), 5).shape == (1, 2)


def test_a_decoy_is_normalised_against_the_other_folds_only():
    ids = [f"T{i}" for i in range(40)]
    fold = dict(zip(ids, fold_of(ids, 2)))
    a, b, c = ids[0], next(i for i in ids if fold[i] == fold[ids[0]] and i != ids[0]), \
        next(i for i in ids if fold[i] != fold[ids[0]])
    # one query row; hits best first: a (0.9) and b (0.8) share a fold, c (0.5) is in the other
    hits = (np.array([[0.9, 0.8, 0.5, -np.inf]]), np.array([[a, b, c, ""]], object), np.array([[0, 0, 0, 0]]))
    scores, got, _ = decoy_hits(hits, folds=2, neighbours=1, beta=1.0, k=3)
    want = {a: 0.9 - 0.5, b: 0.8 - 0.5, c: 0.5 - 0.9}  # a and b never normalise each other away
    assert list(got[0]) == [a, b, c]
    np.testing.assert_allclose(scores[0], [want[i] for i in got[0]], rtol=1e-6)
    raw, _, _ = decoy_hits(hits, folds=2, neighbours=1, beta=0.0, k=4)  # no normalisation: raw scores
    np.testing.assert_allclose(raw[0, :3], [0.9, 0.8, 0.5])
    assert raw[0, 3] == -np.inf  # no fourth hit


def test_threshold_by_hand():
    real, decoys = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], [0.45, 0.25]
    # decoys above each score, plus one: 1 1 1 1 1 1 2 2 3 3 -> FDR 1/1 .. 1/6, 2/7, 2/8, 3/9, 3/10
    e = estimate_threshold(real, decoys, ratio=1.0, target=0.8)
    assert (e.threshold, e.pairs, e.decoys) == (0.5, 6, 0) and e.precision == pytest.approx(5 / 6)
    e = estimate_threshold(real, decoys, ratio=1.0, target=0.75)
    assert (e.threshold, e.pairs, e.decoys, e.precision) == (0.3, 8, 1, 0.75)
    # twice the references: twice the false pairs
    assert estimate_threshold(real, decoys, ratio=2.0, target=0.75).threshold is None
    assert estimate_threshold(real, decoys, ratio=2.0, target=0.6).threshold == 0.5
    # no decoy above any prediction: still one counted, so 10 predictions reach 0.9 and no fewer
    assert estimate_threshold(real, [], ratio=1.0, target=0.9).threshold == 0.1
    assert estimate_threshold(real[:9], [], ratio=1.0, target=0.9).threshold is None
    assert estimate_threshold([0.1, 0.2], [0.9, 0.8], 1.0, 0.9).threshold is None
    with pytest.raises(ValueError, match="target precision"):
        estimate_threshold(real, decoys, 1.0, 1.0)


def test_q_values_by_hand_in_the_order_given():
    real, decoys = [0.3, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.4, 0.1], [0.45, 0.25]
    # best first: FDR 1/1 .. 1/6 down to 0.5, 2/7 and 2/8 at the tied 0.4s, 2/9 at 0.3, 3/10 at 0.1;
    # each takes the lowest FDR of the cuts that keep it
    q = q_values(real, decoys, ratio=1.0)
    np.testing.assert_allclose(q, [2 / 9, 1 / 6, 1 / 6, 1 / 6, 1 / 6, 1 / 6, 1 / 6, 2 / 9, 2 / 9, 3 / 10])
    assert q_values([0.1, 0.2], [0.9, 0.8], ratio=2.0).tolist() == [1.0, 1.0]  # a share, never above 1
    for target in (0.7, 0.75, 0.8):  # the threshold keeps exactly the pairs whose q reaches the target
        t = estimate_threshold(real, decoys, 1.0, target).threshold
        assert ((np.array(real) >= t) == (q <= 1 - target + 1e-12)).all()


def test_the_q_curve_gives_each_prediction_its_q_value_rounded_up_and_new_scores_the_one_below():
    real = np.array([0.3, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.4, 0.1])
    curve = q_curve(real, q_values(real, [0.45, 0.25], ratio=1.0))  # q: 1/6 down to 0.5, 2/9 to 0.3, 3/10
    assert curve == [(0.5, 0.167), (0.3, 0.223), (0.1, 0.3)]
    assert [q_at(curve, s) for s in real] == [0.223, *[0.167] * 6, 0.223, 0.223, 0.3]
    # between predictions: the q of the best one scoring at most as high; past either end, the end's
    assert [q_at(curve, s) for s in (2.0, 0.45, 0.35, 0.05)] == [0.167, 0.223, 0.223, 0.3]


def test_the_estimate_finds_the_precision_it_aims_at():
    """Copies score higher than non-copies; the decoys are non-copies drawn like the predictions'
    false pairs: the precision actually reached at the threshold is the target."""
    rng = np.random.default_rng(0)
    n_queries, k = 4000, 10
    false = rng.gumbel(0.0, 0.03, (n_queries, k))  # each query's k best non-copies
    copy = rng.normal(0.3, 0.08, n_queries // 3)  # a third of the queries are copies
    scores = np.concatenate([false.ravel(), copy])
    truth = np.r_[np.zeros(false.size, bool), np.ones(copy.size, bool)]
    decoys = rng.gumbel(0.0, 0.03, (n_queries, k)).ravel()
    for target in (0.8, 0.9, 0.95):
        e = estimate_threshold(scores, decoys, ratio=1.0, target=target)
        kept = scores >= e.threshold
        assert kept.sum() == e.pairs
        assert truth[kept].mean() == pytest.approx(target, abs=0.03)  # picking the lowest: slightly liberal


def test_decoys_weighted_by_the_fold_factor_count_the_false_references():
    """Non-copy similarities to references and train photos drawn alike: a reference is
    normalised against all train photos, a decoy against the other folds, so decoys cross a
    score 5/4 as often; weighted by fold_factor(5) they match the references' count."""
    rng = np.random.default_rng(0)
    n_queries, n_train, n_refs, folds = 4000, 500, 500, 5
    ids = np.array([f"T{i:04d}" for i in range(n_train)], object)
    train = rng.gumbel(0.0, 0.03, (n_queries, n_train))
    refs = np.sort(rng.gumbel(0.0, 0.03, (n_queries, n_refs)), axis=1)[:, ::-1][:, :10] - train.max(axis=1, keepdims=True)
    order = np.argsort(-train, axis=1)[:, :50]  # each query's best train hits, best first
    hits = (np.take_along_axis(train, order, axis=1), ids[order], np.zeros_like(order))
    decoys, _, _ = decoy_hits(hits, folds=folds, neighbours=1, beta=1.0, k=10)
    for x in (0.0, 0.02):
        false_refs, crossing = (refs >= x).sum(), (decoys >= x).sum()
        assert crossing / false_refs == pytest.approx(folds / (folds - 1), rel=0.08)
        assert crossing * fold_factor(folds) == pytest.approx(false_refs, rel=0.08)
    with pytest.raises(ValueError, match="folds must be >= 2"):
        fold_factor(1)
