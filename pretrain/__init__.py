"""Model building: backbones, pooling, checkpoints and the model-card registry."""

import os

# Weights are only ever loaded from local paths; keep the HF hub from retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
