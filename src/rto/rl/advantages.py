"""Advantage estimators: (rewards, values, mask) -> (advantages, returns), all (B, T).

    gae            delta_t = r_t + gamma * V_{t+1} - V_t     (V after the last real token = 0)
                   A_t = sum_k (gamma * lambda)^k delta_{t+k},   returns R_t = A_t + V_t
                   (Schulman et al. 2016; paper: gamma 1, lambda 0.95)
    reinforce_pp   A_t = sum_{s >= t} gamma^(s-t) r_s, the reward-to-go with the token-level KL
                   penalty inside r, normalised over the whole batch (REINFORCE++, Hu 2025); no critic

`whiten` normalises over all real tokens of the rollout batch; `reduce_sum` lets distributed runs
use the statistics of the global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ESTIMATORS = ("gae", "reinforce_pp")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    real = mask.bool()
    values = values.masked_fill(~real, 0.0)
    rewards = rewards.masked_fill(~real, 0.0)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages.masked_fill(~real, 0.0)
    return advantages, (advantages + values).masked_fill(~real, 0.0)


def reward_to_go(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    real = mask.bool()
    rewards = rewards.masked_fill(~real, 0.0)
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    returns = returns.masked_fill(~real, 0.0)
    return returns.clone(), returns


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(x - mean) / std over the masked entries (of every process, with `reduce_sum`)."""
    real = mask.bool()
    mask = mask.float()
    x = x.masked_fill(~real, 0.0)
    stats = torch.stack([x.sum(), mask.sum()])
    if reduce_sum is not None:
        stats = reduce_sum(stats)
    mean = stats[0] / stats[1].clamp(min=1)
    sq = ((x - mean) ** 2 * mask).sum().reshape(1)
    if reduce_sum is not None:
        sq = reduce_sum(sq)
    var = sq[0] / (stats[1] - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out.masked_fill(~real, 0.0)


def estimate(
    name: str,
    rewards: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "gae":
        if values is None:
            raise ValueError("gae needs critic values")
        return gae(rewards, values, mask, gamma, lam)
    if name == "reinforce_pp":
        return reward_to_go(rewards, mask, gamma)
    raise ValueError(f"unknown advantage estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
