"""Training: the trainer in parts (run directory, checkpoints and lock, early stopping, the epoch report,
the loop), the data a run sees, TensorBoard and MLflow, torchrun/DDP."""
