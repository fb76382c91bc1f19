"""Training loops (BYOL, instance fine-tuning), their Ray Train wrappers and the fan-out."""
