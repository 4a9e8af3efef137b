"""The training engine shared by every stage: accelerate, optimiser and schedule, checkpoints,
metrics and progress."""
