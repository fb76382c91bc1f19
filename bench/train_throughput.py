"""Training throughput: images/s of BYOL and instance fine-tuning steps fed by the real data
pipeline (photos decoded per item -> recipe copies -> card preprocessing -> DataLoader), against raw
forward+backward+step of the same model on one batch already in memory. The ratio says how
much the data pipeline starves the model (1.0 = not at all; target >= 0.8).

    .venv/bin/python bench/train_throughput.py --photos bench/sample/train --backbone resnet18 \
        --size 64 --batch 16 --steps 6 --loader-workers 1

Images counted: BYOL 2 views per photo, fine-tuning K copies per photo.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from core.models.backbones import build_backbone  # noqa: E402
from core.models.preprocess import Preprocess  # noqa: E402
from core.models.resolve import card_for_model  # noqa: E402
from pretrain.data import CopyViews, make_loader, set_loader_epoch  # noqa: E402
from pretrain.losses import build_loss  # noqa: E402
from pretrain.photos import LazyPhotos, PhotoFiles  # noqa: E402
from pretrain.recipes import get_recipe  # noqa: E402
from pretrain.ssl import BYOL  # noqa: E402
from pretrain.train.byol import byol_step  # noqa: E402
from pretrain.train.finetune import InstanceModel, instance_step  # noqa: E402

CPU = torch.device("cpu")


def batches(loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches, a new epoch whenever the loader runs out."""
    epoch = 0
    while True:
        set_loader_epoch(loader, epoch)
        yield from loader
        epoch += 1


def rate(step: Callable[[], None], steps: int, warmup: int, images_per_step: int) -> float:
    """images/s over ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * images_per_step / (time.perf_counter() - t0)


def measure(name: str, model: torch.nn.Module, loader: torch.utils.data.DataLoader,
            update: Callable[[torch.Tensor, torch.Tensor], float], images: int, args: argparse.Namespace) -> None:
    feed = batches(loader)
    fixed = next(feed)
    fed = rate(lambda: update(*next(feed)), args.steps, args.warmup, images)
    raw = rate(lambda: update(*fixed), args.steps, args.warmup, images)
    print(f"{name:9s} pipeline {fed:8.1f} img/s   raw fwd+bwd {raw:8.1f} img/s   ratio {fed / raw:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", default="bench/sample/train", help="folder of training photos")
    p.add_argument("--limit", type=int, default=None, help="use at most this many photos")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=64, help="input side in pixels")
    p.add_argument("--batch", type=int, default=16, help="photos per step")
    p.add_argument("--copies", type=int, default=2, help="fine-tuning copies per photo")
    p.add_argument("--recipe", default="basic", help="fine-tuning recipe")
    p.add_argument("--loss", default="arcface")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--loader-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    photos = LazyPhotos(PhotoFiles.from_folder(args.photos, args.limit), max_side=2 * args.size)
    backbone = build_backbone(args.backbone, dim=128, img_size=args.size)
    pre = Preprocess.for_card(card_for_model(backbone, name="bench"), args.size)
    print(f"{len(photos)} photos, {args.backbone} at {args.size} px, {args.batch} photos/step, "
          f"{args.loader_workers} loader workers, {torch.get_num_threads()} torch threads")

    def loader(recipe: str, views: int) -> torch.utils.data.DataLoader:
        ds = CopyViews(photos, get_recipe(recipe), views=views, pre=pre, seed=0)
        return make_loader(ds, args.batch, num_workers=args.loader_workers)

    byol = BYOL(backbone, proj_hidden=1024, proj_dim=128, pred_hidden=1024)
    opt = torch.optim.SGD(byol.trainable_parameters(), lr=0.01, momentum=0.9)
    measure("BYOL", byol, loader("byol_views", 2), lambda b, _: byol_step(byol, b, opt, 0.99, CPU),
            2 * args.batch, args)

    net = InstanceModel(backbone, build_loss(args.loss, num_classes=len(photos), dim=backbone.dim))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    measure("finetune", net, loader(args.recipe, args.copies),
            lambda b, y: instance_step(net, b, y, opt, CPU), args.copies * args.batch, args)


if __name__ == "__main__":
    main()
