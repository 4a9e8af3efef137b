"""PPO losses and diagnostics, over (B, T) response tokens with a mask.

    policy   L = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)),  rho_t = pi/pi_old
    value    L = 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - eps_v, V_old + eps_v) - R_t)^2)

Means are over all real tokens of the (micro) batch. Diagnostics practitioners read: clip
fraction, approx KL (k3 estimator: (rho - 1) - log rho), explained variance.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    x = x.masked_fill(~mask.bool(), 0.0)
    mask = mask.float()
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    log_ratio = (logp - logp_old).masked_fill(~mask.bool(), 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    values_old: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    err = (values - returns) ** 2
    if clip is not None:
        clipped = values_old + torch.clamp(values - values_old, -clip, clip)
        err_clipped = (clipped - returns) ** 2
        loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
        frac = masked_mean((err_clipped > err).float(), mask)
    else:
        loss = 0.5 * masked_mean(err, mask)
        frac = torch.zeros((), device=values.device)
    return loss, {"clipfrac": frac.detach()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over real tokens (1 = perfect critic, <= 0 = useless)."""
    m = mask.bool()
    r, v = returns[m].float(), values[m].float()
    var = r.var() if r.numel() > 1 else torch.tensor(0.0)
    return float("nan") if var == 0 else float(1.0 - (r - v).var() / var)
