"""Patch-planning throughput per preset, against bare decode + resize of the same files.

    .venv/bin/python bench/patch_throughput.py ../shared/bench/minidisc-dev/queries --limit 50
    .venv/bin/python bench/patch_throughput.py DIR --presets d2lv --detector copy-detector-cpu --proposals 20

For each preset, planning = decode every image + selective search / detector where the preset
asks for them + the patch boxes (``plan_images``), on one CPU core. (The patch stage skips the
decode for geometric-only sides: their plan depends on the image id alone.) The baseline
decodes each file and resizes it to 224x224, the least any embedding pass does.
ratio = planning img/s / baseline img/s. Rates are per CPU-second of this process (OpenCV and
torch limited to one thread), so other load on the machine does not skew them.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

import cv2  # noqa: E402

from core.imageio import list_images as scan_folder  # noqa: E402
from core.imageio import load_rgb  # noqa: E402
from jobs.stages.patch import resolve_detector  # noqa: E402
from patchers.plan import plan_images  # noqa: E402
from patchers.views import PRESETS, ViewConfig  # noqa: E402


def images_per_s(fn, n: int, repeats: int) -> float:
    """Best of ``repeats`` timed runs of ``fn()`` (which handles ``n`` images), after one warm-up."""
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    return n / best


def _timed(fn) -> float:
    # CPU time of this process (one thread): stable on a shared machine, unlike wall time
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="image folder")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--presets", nargs="+", default=["global", "fast", "ref_fast", "d2lv", "ref_d2lv"],
                   choices=sorted(PRESETS))
    p.add_argument("--detector", help="registered detector to add to the presets that use pixels")
    p.add_argument("--registry", help="model registry folder")
    p.add_argument("--proposals", type=int, help="proposal budget for the presets that use proposals "
                                                  "(default: the preset's; configs/sscd_d2lv.yaml uses 20)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    cv2.setNumThreads(1)
    import torch
    torch.set_num_threads(1)
    files = scan_folder(args.folder, args.limit)
    base = images_per_s(lambda: [load_rgb(f).resize((224, 224)) for _, f in files], len(files), args.repeats)
    print(f"{len(files)} images from {args.folder}; baseline decode+resize(224): {base:.1f} img/s")
    print(f"{'preset':<10} {'patches/img':>11} {'img/s':>8} {'ratio':>6}")
    for name in args.presets:
        local = bool(PRESETS[name].get("proposals"))
        budget = {"proposals": args.proposals} if local and args.proposals is not None else {}
        cfg = ViewConfig(preset=name, detector=args.detector if local else None, **budget)
        detector = resolve_detector(cfg.detector, args.registry)
        def plan(cfg=cfg, detector=detector):
            return plan_images(files, cfg, detector)[0]
        rate = images_per_s(plan, len(files), args.repeats)
        per_img = plan().num_rows / len(files)
        print(f"{name:<10} {per_img:>11.1f} {rate:>8.1f} {rate / base:>6.3f}")


if __name__ == "__main__":
    main()
