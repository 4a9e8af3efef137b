"""PPO losses and diagnostics, over (B, T) response tokens with a mask.

    policy   L = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)),  rho_t = pi/pi_old
             (rl.sampler.correction tis: each term times w_t = min(pi_old / pi_vllm, C))
    value    L = 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - eps_v, V_old + eps_v) - R_t)^2)
    kl       L = mean_t exp(l_t) - l_t - 1,  l_t = log pi_ref - log pi_theta  (rl.kl.in_loss: GRPO's
             k3 estimator of KL(pi_theta || pi_ref), Schulman 2020; DeepSeekMath eq. 4), weighted
             by beta2 = rl.kl.coef in the trainer

The mean is over every real token of one optimiser step's minibatch: a micro-batch's losses are
summed over its tokens and divided by `num_tokens`, the real tokens of the whole minibatch across
micro-batches and processes, so that the sum over micro-batches is the minibatch's token mean
whatever train.micro_batch_size (without `num_tokens`: the tokens of the batch given).
Diagnostics practitioners read: clip fraction, approx KL (k3 estimator: (rho - 1) - log rho),
explained variance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    x = x.masked_fill(~mask.bool(), 0.0)
    mask = mask.float()
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


def token_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: float | None) -> torch.Tensor:
    """sum of x over real tokens / num_tokens (default: the real tokens of this batch)."""
    if num_tokens is None:
        return masked_mean(x, mask)
    return x.masked_fill(~mask.bool(), 0.0).sum() / max(num_tokens, 1.0)


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    num_tokens: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped policy loss; `weights` (B, T), when given, multiply each token's term
    (truncated importance sampling: min(pi_old / pi_sampler, C), `sampler_weights`)."""
    log_ratio = (logp - logp_old).masked_fill(~mask.bool(), 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights
    loss = token_mean(per_token, mask, num_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": token_mean((clipped > unclipped).float(), mask, num_tokens),
            "approx_kl": token_mean((ratio - 1.0) - log_ratio, mask, num_tokens),
        }
    return loss, stats


def sampler_weights(logp_old: torch.Tensor, logp_sampler: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (rl.sampler.correction tis): w_t = min(pi_old / pi_sampler, C)
    per token, no gradient. The rollout was drawn from the sampler (vLLM), whose numbers differ
    from the trainer's pi_old; w corrects the policy gradient towards pi_old's, truncated at C to
    bound its variance (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"; TRL's vllm_importance_sampling_cap, veRL's tis_imp_ratio_cap)."""
    return torch.exp(logp_old - logp_sampler).clamp(max=cap).detach()


def kl_loss(
    logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None
) -> torch.Tensor:
    """GRPO's per-token k3 KL to the reference, token mean: unbiased and >= 0 everywhere."""
    log_ratio = (logp_ref - logp).masked_fill(~mask.bool(), 0.0)
    return token_mean(torch.exp(log_ratio) - log_ratio - 1.0, mask, num_tokens)


def value_loss(
    values: torch.Tensor,
    values_old: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    err = (values - returns) ** 2
    if clip is not None:
        clipped = values_old + torch.clamp(values - values_old, -clip, clip)
        err_clipped = (clipped - returns) ** 2
        loss = 0.5 * token_mean(torch.maximum(err, err_clipped), mask, num_tokens)
        frac = token_mean((err_clipped > err).float(), mask, num_tokens)
    else:
        loss = 0.5 * token_mean(err, mask, num_tokens)
        frac = torch.zeros((), device=values.device)
    return loss, {"clipfrac": frac.detach()}


def explained_variance(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """1 - Var(R - V) / Var(R) over real tokens (1 = perfect critic, <= 0 = useless); over the
    real tokens of every process with `reduce_sum` (a sum over processes)."""
    m = mask.bool()
    r = returns[m].double()
    e = r - values[m].double()
    reduce = reduce_sum or (lambda t: t)
    n, sum_r, sum_e = reduce(
        torch.stack([r.new_tensor(float(r.numel())), r.sum(), e.sum()])
    ).tolist()
    if n < 2:
        return float("nan")
    squares = torch.stack([((r - sum_r / n) ** 2).sum(), ((e - sum_e / n) ** 2).sum()])
    ss_r, ss_e = reduce(squares).tolist()  # two passes: exact even when R is nearly constant
    return float("nan") if ss_r == 0 else 1.0 - ss_e / ss_r
