"""Learning-rate schedule: linear warm-up, then cosine / linear decay to a floor, or constant."""

from __future__ import annotations

import math


def lr_at(
    step: int, total_steps: int, peak: float, *, kind: str, warmup_ratio: float, min_ratio: float
) -> float:
    """Learning rate for optimiser step `step` (0-based) of `total_steps`.

    Paper: cosine, 3% warm-up, floor at 10% of the peak.
    """
    total_steps = max(1, total_steps)
    warmup = int(math.ceil(warmup_ratio * total_steps))
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if kind == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (min_ratio + (1.0 - min_ratio) * shape)
