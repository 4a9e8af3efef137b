"""rto: RLHF with token-level rewards (Reinforced Token Optimization and its baselines)."""

__version__ = "0.1.0"
