"""Pretraining and fine-tuning: BYOL, instance losses, augmentation recipes, Ray Train loops."""
