"""The shared core every layer builds on: data contracts, storage, image I/O, kNN, metrics, models.

Nothing here imports ``pretrain``, ``patchers``, ``ensemble`` or ``jobs`` (the import contract
in pyproject.toml holds it), so a stage, a training loop and the service all see one decoder,
one model layer and one set of file formats.
"""

import os

# Weights are only ever loaded from local paths; keep the HF hub from retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
