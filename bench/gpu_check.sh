#!/usr/bin/env bash
# GPU checks on a machine with an NVIDIA GPU (< 10 minutes on one GPU), from the repository root:
# CUDA extraction equals CPU extraction, fp16 vs fp32 throughput, faiss GPU top-10 equals CPU,
# onnxruntime's CUDA provider, images/s per stage. It installs copydet with the `gpu` extra into
# ./.venv first (as cluster.yaml's setup does), then runs bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash .ci/install
if ! .venv/bin/python -c "import faiss, sys; sys.exit(faiss.get_num_gpus() == 0)" 2>/dev/null; then
  .venv/bin/pip install -q -c .ci/constraints.txt -e '.[gpu]'
  .venv/bin/pip uninstall -y -q faiss-cpu onnxruntime
  .venv/bin/pip install -q --force-reinstall --no-deps faiss-gpu onnxruntime-gpu
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PYTHONUNBUFFERED=1 timeout 540 .venv/bin/python bench/gpu_check.py
