"""Shared fixtures: offline env, one local Ray for the whole session, tiny image sets."""
import atexit
import os
import random
import ast
import shutil
import socket
import subprocess
import sys
import tempfile

if "YOLO_CONFIG_DIR" not in os.environ:  # ultralytics writes its settings there; removed when the session ends
    os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="yolo-cfg-")
    atexit.register(shutil.rmtree, os.environ["YOLO_CONFIG_DIR"], ignore_errors=True)
# offline, no package installs, weights-only unpickling (patchers.detector.predict.ULTRALYTICS_ENV)
OFFLINE = {"HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "ULTRALYTICS_SAFE_LOAD": "1"}
os.environ.update(OFFLINE)

from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray (2 CPUs) shared by every test that needs it."""
    import ray
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",  # not a `ray start` one
                 runtime_env={"env_vars": OFFLINE})
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


PORTS = range(20000, 32768)  # below the kernel's ephemeral ports (32768+) and above Ray's worker ports (10002-19999)


def free_port() -> int:
    """A TCP port free now, drawn where no bind(0) of another process (Ray's own included) lands:
    a port the kernel handed out could be handed out again before the server binds it."""
    for port in random.sample(PORTS, 64):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS}")


def imported_by(code: str, modules: Sequence[str], *argv: str) -> tuple[str, str, list[str]]:
    """Run ``code`` (with ``argv``) in a new interpreter that finds the repo: its stdout, its
    stderr, and which of ``modules`` it had imported by the end. A failing run fails the test."""
    root = str(Path(__file__).resolve().parent.parent)
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {tuple(modules)!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe, *argv], cwd=root, env={**os.environ, "PYTHONPATH": root},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    *out, loaded = done.stdout.strip().splitlines()
    return "\n".join(out), done.stderr, ast.literal_eval(loaded)


def synthetic_photo(seed: int, size=(96, 72)) -> Image.Image:
    """A random 'photo': coloured background, gradient and a few shapes (distinct per seed)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, 3)
    grad = np.linspace(0, 1, w)[None, :, None] * rng.integers(-120, 120, 3)
    arr = np.clip(base + grad + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    for _ in range(5):
        x0, y0 = rng.integers(0, w - 10), rng.integers(0, h - 10)
        d.ellipse([x0, y0, x0 + rng.integers(8, 40), y0 + rng.integers(8, 40)],
                  fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """ISC21 layout: 6 train, 8 references, 6 queries (4 edited copies, 2 unrelated)."""
    return make_tiny_dataset(tmp_path)


def make_tiny_dataset(tmp_path: Path) -> Path:
    """The files of :func:`tiny_dataset` under ``tmp_path/data``."""
    root = tmp_path / "data"
    for sub in ("train", "references", "queries"):
        (root / sub).mkdir(parents=True)
    for i in range(6):
        synthetic_photo(100 + i).save(root / "train" / f"T{i:03d}.jpg")
    refs = [synthetic_photo(i) for i in range(8)]
    for i, img in enumerate(refs):
        img.save(root / "references" / f"R{i:03d}.jpg")
    edits = [lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
             lambda im: im.crop((10, 8, 86, 66)).resize((96, 72)),
             lambda im: im.rotate(90, expand=True),
             lambda im: im.convert("L").convert("RGB")]
    gt = ["query_id,reference_id"]
    for q, (r, edit) in enumerate(zip([1, 3, 5, 7], edits)):
        edit(refs[r]).save(root / "queries" / f"Q{q:03d}.jpg", quality=80)
        gt.append(f"Q{q:03d},R{r:03d}")
    for q in (4, 5):
        synthetic_photo(500 + q).save(root / "queries" / f"Q{q:03d}.jpg")
    (root / "ground_truth.csv").write_text("\n".join(gt) + "\n")
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train faster on one thread (and far faster on a busy shared CPU)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """16 small unlabeled 'photos' for training tests."""
    folder = tmp_path_factory.mktemp("photos")
    for i in range(16):
        synthetic_photo(300 + i, (64, 48)).save(folder / f"T{i:03d}.jpg")
    return folder
