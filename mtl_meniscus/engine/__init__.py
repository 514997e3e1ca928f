"""Training and inference: the trainer, its stopping rule, checkpoints, trained runs, tracking."""
