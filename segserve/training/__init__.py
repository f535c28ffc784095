"""Training and evaluation (extra: train): augmentation, the training loop, checkpoints, records."""
