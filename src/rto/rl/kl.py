"""KL coefficient beta2: fixed, or adaptive to a target (Ziegler et al. 2019):

    beta2 <- beta2 * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)

where KL is the mean per-response KL of the last rollout and n the number of its responses."""

from __future__ import annotations


class KLController:
    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        self.value = coef
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.value *= 1.0 + error * n / self.horizon
