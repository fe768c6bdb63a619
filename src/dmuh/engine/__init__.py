"""Training and inference: building a run's networks, the training loop, pre-training, preflight checks."""
