"""The copy-region detector: synthetic training data (synth), training (train), inference (predict)."""
