"""GPU checks for a machine with an NVIDIA GPU (run by bench/gpu_check.sh; about 5 minutes).

1. CUDA extraction equals CPU extraction: copydet's own encoder (random-init resnet50, seeded) on
   the bundled sample's photos, cosine per row >= 0.999 (fp32) and >= 0.99 (fp16 autocast).
2. fp16 vs fp32 throughput of the same encoder on the GPU (images/s, ratio).
3. faiss on the GPU: top-10 of a GPU flat index equals the CPU's on 200k x 256 vectors.
4. onnxruntime's CUDA provider: an ONNX export of the model runs on CUDAExecutionProvider and
   gives the torch rows.
5. Images/s per pipeline stage: ``copydet run`` on the sample with ``extract.use_gpu=yes``.
Prints one line per check and exits 1 if any check fails.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.imageio import list_images, load_rgb
from core.models.encoders import Encoder, build_encoder
from core.models.resolve import backbone_card
from core.models.runtimes import runtime

ROOT = Path(__file__).resolve().parent.parent

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def rate(enc: Encoder, arrays: list[np.ndarray], batch: int = 64, repeats: int = 3) -> float:
    enc.embed_arrays(arrays[:batch])  # warm-up (cuDNN autotune, allocator)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i in range(0, len(arrays), batch):
            enc.embed_arrays(arrays[i:i + batch])
    torch.cuda.synchronize()
    return repeats * len(arrays) / (time.perf_counter() - t0)


def encoders() -> None:
    card = backbone_card("resnet50")
    photos = [load_rgb(p) for _, p in list_images(ROOT / "bench" / "sample" / "references")]
    cpu = build_encoder(card, 224, "cpu")
    arrays = [cpu.pre.resize(p) for p in photos] * 8
    want = cpu.embed_arrays(arrays[:len(photos)])
    for precision, floor in (("float32", 0.999), ("float16", 0.99)):
        gpu = Encoder(card.name, cpu.pre, runtime(card, "cuda", precision), card.dim)
        got = gpu.embed_arrays(arrays[:len(photos)])
        cos = (want * got).sum(axis=1)
        check(f"CUDA {precision} rows equal CPU rows", cos.min() >= floor, f"min cosine {cos.min():.5f} (>= {floor})")
    fp32 = rate(Encoder(card.name, cpu.pre, runtime(card, "cuda", "float32"), card.dim), arrays)
    fp16 = rate(Encoder(card.name, cpu.pre, runtime(card, "cuda", "float16"), card.dim), arrays)
    check("fp16 vs fp32 throughput", fp16 > 0 and fp32 > 0, f"fp32 {fp32:.0f} img/s, fp16 {fp16:.0f} img/s, "
          f"ratio {fp16 / fp32:.2f} (resnet50 @224, batch 64)")


def faiss_gpu() -> None:
    import faiss

    from core.knn import knn
    gpus = faiss.get_num_gpus()
    check("faiss sees a GPU", gpus > 0, f"{gpus} GPU(s)")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200_000, 256)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:2000] + 0.05 * rng.normal(size=(2000, 256)).astype(np.float32)
    cpu = faiss.IndexFlatIP(256)
    cpu.add(x)
    t0 = time.perf_counter()
    _, want = cpu.search(q, 10)
    cpu_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, got = knn(q, x, 10)  # core.knn puts the flat index on every GPU faiss sees
    gpu_s = time.perf_counter() - t0
    same = float((want == got).mean())
    check("faiss GPU top-10 equals CPU", same >= 0.999, f"{same:.4f} of ids equal; CPU {cpu_s:.2f} s, "
          f"GPU {gpu_s:.2f} s (incl. copy to the GPU)")


def onnx_cuda(tmp: Path) -> None:
    import onnxruntime as ort

    from core.models.external import import_external
    from core.models.resolve import build_model
    card = backbone_card("resnet18")
    model = build_model(card).eval()
    x = torch.randn(4, 3, 224, 224)
    torch.onnx.export(model, (x,), tmp / "r18.onnx", input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    ext = import_external(tmp / "r18.onnx", "r18", registry=tmp, input_size=224, mean=card.mean, std=card.std)
    forward = runtime(ext, "cuda")
    session_providers = ort.InferenceSession(str(tmp / "r18.onnx"),
                                             providers=["CUDAExecutionProvider", "CPUExecutionProvider"]).get_providers()
    check("onnxruntime CUDA provider active", session_providers[0] == "CUDAExecutionProvider",
          f"providers {session_providers}")
    with torch.inference_mode():
        want = model(x).numpy()
    got = forward(x.numpy())
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    check("ONNX on CUDA equals torch", float((want * got).sum(axis=1).min()) >= 0.999, "min cosine "
          f"{float((want * got).sum(axis=1).min()):.5f}")


def stages(tmp: Path) -> None:
    out = tmp / "run"
    cmd = [sys.executable, "-m", "jobs.cli", "run", "configs/smoke.yaml", "--out", str(out), "--set", "extract.use_gpu=yes",
           "--set", "extract.cpus_per_actor=2", "--set", "models=[{name: resnet50, scales: [224], batch_size: 64}]"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    ok = proc.returncode == 0 and (out / "timings.json").is_file()
    if not ok:
        check("copydet run on the GPU", False, proc.stderr[-2000:])
        return
    timings = json.loads((out / "timings.json").read_text())
    images = sum(1 for _ in (ROOT / "bench" / "sample").rglob("*.jpg"))
    per_stage = ", ".join(f"{k} {images / v:.0f} img/s" for k, v in timings.items() if v > 0 and k != "total")
    check("copydet run on the GPU", True, f"{images} images, total {timings['total']:.1f} s; {per_stage}")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine")
        return 1
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for fn in (encoders, faiss_gpu, lambda: onnx_cuda(Path(tmp)), lambda: stages(Path(tmp))):
            try:
                fn()
            except Exception as e:  # a broken check is reported and the others still run
                check(getattr(fn, "__name__", "check"), False, f"{type(e).__name__}: {e}")
    print(f"{len(FAILED)} check(s) failed" if FAILED else "all GPU checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
