"""Fine-tuning losses fall on a fixed batch; the miners pick the known triplets."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.losses import (
    LOSSES,
    ArcFaceLoss,
    CosFaceLoss,
    InfoNCELoss,
    build_loss,
    hardest_negatives,
    hardest_positives,
    pairwise_distances,
    semi_hard_negatives,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def optimise(name: str, params: dict, steps: int = 40) -> tuple[float, float]:
    """First and last loss of a linear embedder trained on one fixed noisy batch."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)[LABELS] + 0.8 * torch.randn(8, 16)  # 4 photos, 2 noisy copies each
    model = torch.nn.Linear(16, 8)
    loss_fn = build_loss(name, num_classes=4, dim=8, params=params)
    opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=0.05)
    losses = []
    for _ in range(steps):
        loss = loss_fn(F.normalize(model(x), dim=1), LABELS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


@pytest.mark.parametrize(
    "name, params",
    [("arcface", {}), ("cosface", {}), ("triplet", {"mining": "hard"}),
     ("triplet", {"mining": "semihard", "margin": 0.5}), ("infonce", {}),
     ("infonce", {"queue_size": 16})],
)
def test_loss_falls_on_a_fixed_batch(name, params):
    first, last = optimise(name, params)
    assert math.isfinite(first) and last < 0.6 * first


def test_every_registered_loss_is_tested():
    assert set(LOSSES) == {"arcface", "cosface", "triplet", "infonce"}


# 1-D points: class 0 at 0 and 1, class 1 at 1.5 and 4, class 2 at 10.
POINTS = torch.tensor([[0.0], [1.0], [1.5], [4.0], [10.0]])
CLASSES = torch.tensor([0, 0, 1, 1, 2])


def test_batch_hard_mining_known_answer():
    dist = pairwise_distances(POINTS)
    assert hardest_positives(dist, CLASSES).tolist() == [1, 0, 3, 2, -1]
    # closest other-class point: 0 -> 1.5 (idx 2), 1 -> 1.5, 1.5 -> 1, 4 -> 1, 10 -> 4
    assert hardest_negatives(dist, CLASSES).tolist() == [2, 2, 1, 1, 3]


def test_semi_hard_mining_known_answer():
    dist = pairwise_distances(POINTS)
    # margin 2.5; window d_ap < d_an < d_ap + 2.5 around each anchor's hardest positive:
    # anchor 0 (at 0): d_ap 1, negatives at 1.5, 4, 10 -> 1.5 (idx 2)
    # anchor 1 (at 1): d_ap 1, negatives at 0.5, 3, 9 -> 3 (idx 3), not the hardest (idx 2)
    # anchor 2 (at 1.5): d_ap 2.5, negatives at 1.5, 0.5, 8.5 -> none: hardest negative, idx 1
    # anchor 3 (at 4): d_ap 2.5, negatives at 4, 3, 6 -> 3 (idx 1)
    assert semi_hard_negatives(dist, CLASSES, margin=2.5).tolist()[:4] == [2, 3, 1, 1]


def test_margins_lower_the_true_class_logit():
    cos = torch.tensor([[0.8]])
    arc = ArcFaceLoss(2, 4, margin=0.3).margin_cos(cos)
    assert arc.item() == pytest.approx(math.cos(math.acos(0.8) + 0.3), abs=1e-6)
    assert CosFaceLoss(2, 4, margin=0.35).margin_cos(cos).item() == pytest.approx(0.45)


def test_infonce_queue_adds_negatives_of_other_photos():
    loss_fn = InfoNCELoss(dim=2, temperature=1.0, queue_size=4)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert loss_fn.eval()(a, torch.tensor([0, 0])).item() == pytest.approx(0.0, abs=1e-6)
    loss_fn.train()(a, torch.tensor([5, 5]))  # enqueue two entries of photo 5 ...
    loss_fn.train()(a, torch.tensor([0, 0]))  # ... and two of photo 0
    assert loss_fn.queue_labels.tolist() == [5, 5, 0, 0]
    # all logits are 1: the positive plus the two photo-5 negatives -> log 3; the queue
    # entries of the anchors' own photo 0 are skipped (else log 5)
    assert loss_fn.eval()(a, torch.tensor([0, 0])).item() == pytest.approx(math.log(3), abs=1e-5)


def test_bad_loss_config_is_named():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        build_loss("hinge", num_classes=2, dim=4)
    with pytest.raises(ValueError, match="'triplet'.*bad parameters"):
        build_loss("triplet", num_classes=2, dim=4, params={"scale": 3})
    with pytest.raises(ValueError, match="unknown triplet mining 'easy'"):
        build_loss("triplet", num_classes=2, dim=4, params={"mining": "easy"})
