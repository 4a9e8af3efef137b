"""Advantage estimators: (rewards, values, mask) -> (advantages, returns), all (B, T).

    gae            delta_t = r_t + gamma * V_{t+1} - V_t     (V after the last real token = 0)
                   A_t = sum_k (gamma * lambda)^k delta_{t+k},   returns R_t = A_t + V_t
                   (Schulman et al. 2016; paper: gamma 1, lambda 0.95)
    reinforce_pp   A_t = sum_{s >= t} gamma^(s-t) r_s, the reward-to-go with the token-level KL
                   penalty inside r, normalised over the whole batch (REINFORCE++, Hu 2025); no critic

The group estimators (no critic; rl.samples_per_prompt K >= 2 responses per prompt, a group each,
`group` holding a group id per response) split the full per-token reward r_{i,t} (rewards.
token_rewards: token sources such as the DPO reward, the KL penalty when it is in the reward,
the sentence rewards on the last token) into its sentence part s_i (the score and sentence reward
functions, `rewards.sentence_part`) and its dense part d_{i,t} = r_{i,t} - [t == H_i] s_i, give
each its group baseline, and sum the result from each token on (gamma = 1 in the papers):

    A_{i,t} = sum_{u >= t} gamma^(u-t) (d'_{i,u} + [u == H_i] s'_i)

    rloo                   PRIME (Cui et al. 2025, arXiv 2502.01456, eq. 5), leave-one-out:
                           s'_i = s_i - 1/(K-1) sum_{j != i} s_j
                           d'_{i,t} = d_{i,t} - 1/(K-1) sum_{j != i} (1/|y_j|) sum_u d_{j,u}
                           (the other samples' mean per-token reward)
    grpo                   GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300): the sentence part
                           normalised in its group (outcome supervision, 4.1.2), the dense part
                           normalised over every token of its group (process supervision, 4.1.3):
                           s'_i = (s_i - mean_g s) / (std_g s + eps)
                           d'_{i,t} = (d_{i,t} - mean_g d) / (std_g d + eps)
                           std unbiased, eps = 1e-6; std_normalization False (Dr. GRPO, Liu et al.
                           2025, arXiv 2503.20783) subtracts the mean only. With no dense part
                           (rl.dpo_reward.scale 0, KL in the loss) this is plain GRPO. Under the std
                           the dense part's weight (beta1) no longer scales it, only its shape does.
    reinforce_pp_baseline  REINFORCE++-baseline (Hu 2025, OpenRLHF): s'_i = s_i - mean_g s, the dense
                           part (KL, token rewards) as it is; then whitened over the batch.

A group whose values are all equal gets exactly 0 for that part (no NaN, no rounding noise).

`whiten` normalises over all real tokens of the rollout batch; `reduce_sum` lets distributed runs
use the statistics of the global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rto.rl.rewards import place_at_last

ESTIMATORS = ("gae", "reinforce_pp", "rloo", "grpo", "reinforce_pp_baseline")
GROUP_ESTIMATORS = ESTIMATORS[2:]
EPS = 1e-6


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


def _group_stats(
    x: torch.Tensor, weight: torch.Tensor, group: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per response, of the entries of its group with weight 1 (x, weight: (B,) or (B, T)): (count,
    sum, unbiased variance, whether they are all equal), each (B,)."""
    ids = torch.unique(group, return_inverse=True)[1]
    n_groups = int(ids.max()) + 1 if len(ids) else 0
    rows = ids.view(-1, *([1] * (x.dim() - 1))).expand_as(x).reshape(-1)
    real = weight.reshape(-1).bool()
    xs = x.reshape(-1).to(torch.float64)[real]
    rows = rows[real]
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=x.device)
    count = zeros.index_add(0, rows, torch.ones_like(xs))
    total = zeros.index_add(0, rows, xs)
    mean = total / count.clamp(min=1)
    var = zeros.index_add(0, rows, (xs - mean[rows]) ** 2) / (count - 1).clamp(min=1)
    hi = zeros.scatter_reduce(0, rows, xs, "amax", include_self=False)
    lo = zeros.scatter_reduce(0, rows, xs, "amin", include_self=False)
    return count[ids], total[ids], var[ids], (hi == lo)[ids]


def group_advantages(
    name: str,
    rewards: torch.Tensor,
    sentence: torch.Tensor,
    group: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    std_normalization: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) of a group estimator (rloo, grpo, reinforce_pp_baseline, above):
    `rewards` (B, T) the full per-token reward, `sentence` (B,) its sentence part (on the last real
    token), `group` (B,) a group id per response."""
    real = mask.bool()
    rewards = rewards.masked_fill(~real, 0.0)
    dense = (rewards - place_at_last(sentence.to(rewards.dtype), mask)).masked_fill(~real, 0.0)
    ones = torch.ones_like(sentence)
    k, s_sum, s_var, s_equal = _group_stats(sentence, ones, group)
    s = sentence.double()
    if name == "rloo":
        s_adj = s - (s_sum - s) / (k - 1).clamp(min=1)
        length = mask.double().sum(1).clamp(min=1)
        per_token = dense.double().sum(1) / length  # each response's mean per-token reward
        _, m_sum, _, m_equal = _group_stats(per_token, ones, group)
        d_base = (m_sum - per_token) / (k - 1).clamp(min=1)
        d_adj = torch.where(m_equal.unsqueeze(1), dense.double() - per_token.unsqueeze(1),
                            dense.double() - d_base.unsqueeze(1))  # fmt: skip
    elif name == "grpo":
        s_adj = s - s_sum / k
        n, d_sum, d_var, d_equal = _group_stats(dense, mask, group)
        d_adj = dense.double() - (d_sum / n.clamp(min=1)).unsqueeze(1)
        if std_normalization:
            s_adj = s_adj / (s_var.sqrt() + EPS)
            d_adj = d_adj / (d_var.sqrt() + EPS).unsqueeze(1)
        d_adj = d_adj.masked_fill(d_equal.unsqueeze(1), 0.0)
    elif name == "reinforce_pp_baseline":
        s_adj = s - s_sum / k
        d_adj = dense.double()
    else:
        raise ValueError(
            f"{name!r} is not a group estimator; choose one of {', '.join(GROUP_ESTIMATORS)}"
        )
    s_adj = s_adj.masked_fill(s_equal, 0.0)
    shaped = (d_adj + place_at_last(s_adj, mask)).masked_fill(~real, 0.0)
    adv = reward_to_go(shaped, mask, gamma)[0].to(rewards.dtype)
    return adv, adv.clone()


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
    sentence: torch.Tensor | None = None,
    group: torch.Tensor | None = None,
    std_normalization: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on rl.advantage_estimator; the group estimators also need `sentence` (B,) and
    `group` (B,)."""
    if name in GROUP_ESTIMATORS:
        if sentence is None or group is None:
            raise ValueError(f"{name} needs the sentence rewards and the group of every response")
        return group_advantages(name, rewards, sentence, group, mask, gamma=gamma,
                                std_normalization=std_normalization)  # fmt: skip
    if name == "gae":
        if values is None:
            raise ValueError("gae needs critic values")
        return gae(rewards, values, mask, gamma, lam)
    if name == "reinforce_pp":
        return reward_to_go(rewards, mask, gamma)
    raise ValueError(f"unknown advantage estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
