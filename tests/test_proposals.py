"""Region proposals: NMS, dedup against geometric views and budgets on hand-made boxes."""
import numpy as np
import pytest

from patchers.proposals import (
    ProposalParams,
    image_views,
    merge_boxes,
    selective_search,
)
from patchers.views import FULL, ViewConfig, plan_views
from tests.conftest import synthetic_photo


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def same(views, boxes):
    """The views' boxes equal ``boxes`` (in order, to float32 precision)."""
    return len(views) == len(boxes) and np.allclose([v.box for v in views], boxes, atol=1e-6)


A, B, C = (0.0, 0.0, 0.5, 0.5), (0.05, 0.05, 0.55, 0.55), (0.5, 0.5, 1.0, 1.0)


def test_nms_keeps_the_best_of_overlapping_boxes():
    assert _iou(A, B) == pytest.approx(0.2025 / 0.2975)  # 0.68: hand-computed overlap
    views = merge_boxes([B, A, C], [0.8, 0.9, 0.7], ["proposal"] * 3, iou=0.5)
    assert same(views, [A, C])
    assert [v.score for v in views] == pytest.approx([0.9, 0.7])
    assert all(v.kind == "proposal" and v.rotation == 0 and not v.flip for v in views)
    # above the pair's IoU, nothing is suppressed; order is by score
    assert same(merge_boxes([B, A, C], [0.8, 0.9, 0.7], ["proposal"] * 3, iou=0.7), [A, B, C])


def test_detections_win_over_overlapping_proposals():
    views = merge_boxes([A, B], [0.99, 0.3], ["proposal", "detection"], iou=0.5)
    assert same(views, [B]) and views[0].kind == "detection" and views[0].score == pytest.approx(0.3)


def test_boxes_a_geometric_view_covers_are_dropped():
    near_full = (0.0, 0.0, 0.98, 0.99)
    views = merge_boxes([near_full, A], [0.9, 0.8], ["proposal"] * 2, against=[FULL], dedup_iou=0.8)
    assert same(views, [A])
    # a 0.5 centre crop view removes an almost identical proposal, not a distinct one
    crop = (0.25, 0.25, 0.75, 0.75)
    views = merge_boxes([(0.26, 0.25, 0.75, 0.76), A], [0.9, 0.8], ["proposal"] * 2, against=[FULL, crop])
    assert same(views, [A])


def test_budget_caps_proposals_but_not_detections():
    boxes = [(i / 10, 0.0, i / 10 + 0.1, 0.5) for i in range(10)]  # disjoint strips
    scores = np.linspace(1.0, 0.1, 10)
    views = merge_boxes(boxes, scores, ["proposal"] * 8 + ["detection"] * 2, budget=3)
    assert [v.kind for v in views] == ["detection"] * 2 + ["proposal"] * 3
    assert same(views[2:], boxes[:3]) and same(views[:2], boxes[8:])


def test_min_size_and_bad_inputs():
    views = merge_boxes([(0.1, 0.1, 0.15, 0.9), A], [0.9, 0.5], ["proposal"] * 2, min_size=0.1)
    assert same(views, [A])
    with pytest.raises(ValueError, match="3 sources"):
        merge_boxes([A, B], [0.1, 0.2], ["proposal"] * 3)
    with pytest.raises(ValueError, match="unknown source"):
        merge_boxes([A], [0.1], ["sift"])
    assert merge_boxes(np.zeros((0, 4)), [], []) == []


def test_selective_search_gives_valid_deterministic_boxes():
    img = synthetic_photo(3, size=(128, 96))
    boxes, scores = selective_search(img, budget=10)
    again, _ = selective_search(img, budget=10)
    assert 0 < len(boxes) <= 40 and np.array_equal(boxes, again)
    assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, 2:] > boxes[:, :2])
    assert np.all(np.diff(scores) < 0)


def test_image_views_respect_budget_and_dedup():
    cfg = ViewConfig(center_crops=[0.5], proposals=5)
    img = synthetic_photo(4, size=(128, 96))
    geometric = plan_views(cfg)
    params = ProposalParams(min_size=0.1)
    extra = image_views(img, geometric, cfg.proposals, None, params)
    assert 0 < len(extra) <= 5 and {v.kind for v in extra} == {"proposal"}
    for v in extra:
        w, h = v.box[2] - v.box[0], v.box[3] - v.box[1]
        assert min(w, h) >= params.min_size and w * h <= params.max_area
        assert max(_iou(v.box, g.box) for g in geometric) <= params.dedup_iou
    dets = (np.array([[0.1, 0.1, 0.6, 0.7], [0.2, 0.2, 0.3, 0.3]], np.float32), np.array([0.9, 0.1], np.float32))
    extra = image_views(img, geometric, 0, dets, params)
    assert same(extra, [(0.1, 0.1, 0.6, 0.7)]) and extra[0].kind == "detection"
