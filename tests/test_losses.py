"""Fine-tuning losses (pytorch-metric-learning) fall on a fixed batch, keep this project's
parameter conventions, and the miners pick the known triplets."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.losses import LOSSES, build_loss
from pretrain.losses.triplet import MINERS

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
    "name, params, floor",
    [("arcface", {}, 0.0), ("cosface", {}, 0.0), ("triplet", {"mining": "hard"}, 0.0),
     ("triplet", {"mining": "semihard", "margin": 0.5}, 0.0), ("infonce", {}, 0.0),
     # a memory of two batches holds each photo 4 times: 3 positives per anchor, so the
     # multi-positive loss cannot fall below log 3 (it starts with one positive, floor 0)
     ("infonce", {"queue_size": 16}, math.log(3))],
)
def test_loss_falls_on_a_fixed_batch(name, params, floor):
    first, last = optimise(name, params)
    assert math.isfinite(first) and last - floor < 0.6 * first


def test_every_registered_loss_is_tested():
    assert set(LOSSES) == {"arcface", "cosface", "triplet", "infonce"}


# Points on the unit circle (the triplet distance normalises): class 0 at 0 and 10 degrees,
# class 1 at 15 and 40, class 2 at 100; Euclidean distance grows with the angle between points.
ANGLES = torch.tensor([0.0, 10.0, 15.0, 40.0, 100.0])
POINTS = torch.stack([torch.cos(ANGLES.deg2rad()), torch.sin(ANGLES.deg2rad())], 1)
CLASSES = torch.tensor([0, 0, 1, 1, 2])


def chord(degrees: float) -> float:
    return 2 * math.sin(math.radians(degrees) / 2)


def test_batch_hard_mining_known_answer():
    anchors, positives, negatives = MINERS["hard"]()(POINTS, CLASSES)
    assert anchors.tolist() == [0, 1, 2, 3]  # point 4 has no positive
    assert positives.tolist() == [1, 0, 3, 2]
    # closest other-class point: 0 -> 15 (idx 2), 10 -> 15, 15 -> 10 (idx 1), 40 -> 10
    assert negatives.tolist() == [2, 2, 1, 1]


def test_semi_hard_mining_known_answer():
    anchors, positives, _, negatives = MINERS["semihard"]()(POINTS, CLASSES)
    assert anchors.tolist() == [0, 1, 2, 3] and positives.tolist() == [1, 0, 3, 2]
    # the closest negative farther than the positive:
    # anchor 0 (at 0):  positive 10 deg away, negatives 15, 40, 100 away -> idx 2, the hardest
    # anchor 1 (at 10): positive 10 away, negatives 5, 30, 90 -> idx 3, not the hardest (idx 2)
    # anchor 2 (at 15): positive 25 away, negatives 15, 5, 85 -> idx 4 (only one farther)
    # anchor 3 (at 40): positive 25 away, negatives 40, 30, 60 -> idx 1
    assert negatives.tolist() == [2, 3, 4, 1]


def test_triplet_loss_averages_every_mined_anchor():
    loss = build_loss("triplet", num_classes=3, dim=2, params={"margin": 0.05, "mining": "hard"})
    # anchors 0 and 3 satisfy the margin (zero loss) and still count in the mean
    expected = ((chord(10) - chord(5) + 0.05) + (chord(25) - chord(5) + 0.05)) / 4
    assert loss(POINTS, CLASSES).item() == pytest.approx(expected, abs=1e-6)


def test_margins_keep_the_config_units():
    """``margin`` is in radians for ArcFace (PML takes degrees) and a cosine offset for CosFace."""
    cos = torch.tensor([0.8])
    arc = build_loss("arcface", num_classes=2, dim=4, params={"margin": 0.3}).loss
    cosface = build_loss("cosface", num_classes=2, dim=4, params={"margin": 0.35}).loss
    assert arc.modify_cosine_of_target_classes(cos).item() == pytest.approx(math.cos(math.acos(0.8) + 0.3), abs=1e-6)
    assert cosface.modify_cosine_of_target_classes(cos).item() == pytest.approx(0.45)
    assert arc.scale == cosface.scale == 30.0


@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_class_weights_are_trainable_parameters(name):
    """The class weights are a parameter of the loss module, so a model holding the loss
    (finetune's InstanceModel) trains them and DDP syncs them."""
    loss = build_loss(name, num_classes=5, dim=8)
    assert {k: tuple(p.shape) for k, p in loss.named_parameters()} == {"loss.W": (8, 5)}


def test_losses_run_in_float32_under_autocast():
    """bf16 embeddings from an autocast forward must not turn the loss's state into bf16."""
    emb = F.normalize(torch.randn(8, 8), dim=1).bfloat16().requires_grad_()
    arc = build_loss("arcface", num_classes=4, dim=8)
    nce = build_loss("infonce", num_classes=4, dim=8, params={"queue_size": 8})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [arc(emb, LABELS), nce(emb, LABELS)]
    assert [loss.dtype for loss in losses] == [torch.float32, torch.float32]
    assert arc.loss.W.dtype == nce.loss.embedding_memory.dtype == torch.float32
    sum(losses).backward()
    assert emb.grad.dtype == torch.bfloat16 and torch.isfinite(emb.grad.float()).all()


def test_infonce_memory_adds_earlier_batches():
    """All logits are 1 here, so the loss is log(1 + negatives / positives) per anchor."""
    loss_fn = build_loss("infonce", num_classes=6, dim=2, params={"temperature": 1.0, "queue_size": 6})
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert loss_fn(a, torch.tensor([0, 0])).item() == pytest.approx(0.0, abs=1e-6)  # no negative yet
    # photo 5: its other copy is the positive, the two photo-0 entries in memory are negatives
    assert loss_fn(a, torch.tensor([5, 5])).item() == pytest.approx(math.log(3), abs=1e-5)
    # photo 0 again: its earlier copies in memory are positives too (3 positives, 2 negatives)
    assert loss_fn(a, torch.tensor([0, 0])).item() == pytest.approx(math.log(5 / 3) + math.log(3), abs=1e-5)


def test_bad_loss_config_is_named():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        build_loss("hinge", num_classes=2, dim=4)
    with pytest.raises(ValueError, match="'triplet'.*bad parameters"):
        build_loss("triplet", num_classes=2, dim=4, params={"scale": 3})
    with pytest.raises(ValueError, match="unknown triplet mining 'easy'"):
        build_loss("triplet", num_classes=2, dim=4, params={"mining": "easy"})
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_loss("arcface", num_classes=1, dim=4)
