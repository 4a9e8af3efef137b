"""The direct preference family as pure functions of per-sequence statistics.

Notation (per pair, shape (B,)): pi_w, pi_l = summed log-probs of the chosen (w) and rejected (l)
response under the policy; ref_w, ref_l = the same under the reference; n_w, n_l = response
lengths in tokens; kl_w, kl_l = sequential KL  sum_t KL(pi_ref(.|s_t) || pi(.|s_t))  (TDPO only).

    dpo    -log sigmoid(beta * [(pi_w - ref_w) - (pi_l - ref_l)])                       Rafailov et al. 2023
    ipo    ((pi_w - ref_w)/n_w - (pi_l - ref_l)/n_l - 1/(2 beta))^2                     Azar et al. 2023
    rdpo   -log sigmoid(beta * [(pi_w - ref_w) - (pi_l - ref_l)] + alpha * (n_w - n_l)) Park et al. 2024
    simpo  -log sigmoid(beta * (pi_w/n_w - pi_l/n_l) - gamma)      (no reference)      Meng et al. 2024
    tdpo   -log sigmoid(beta * [(pi_w - ref_w) - (pi_l - ref_l)]
                        - alpha * (beta * kl_l - stopgrad(beta * kl_w)))               Zeng et al. 2024 (TDPO2)

IPO uses length-averaged log-ratios, as its authors recommend for sequences. Implicit rewards
(reported as rewards/chosen, rewards/rejected) are beta * (pi - ref), or beta * pi / n for SimPO.

R-DPO's length term is added, as in Park et al. 2024 (eq. 9) and the SimPO paper's table of
objectives: when the chosen response is the longer one, part of the margin is credited to its
length, so the policy gains less from learning "longer is better". SimPO's gamma is the target
margin of the formula above (absolute); SimPO's own code and recipes give it as a ratio
gamma / beta instead (`simpo_gamma_beta_ratio`, gamma = ratio * beta).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "ipo", "rdpo", "simpo", "tdpo")
# The paper's default beta and alpha per loss are config defaults: rto.config.stages.DEFAULT_BETA,
# DEFAULT_ALPHA (DPOConfig.resolved_beta, resolved_alpha).
REFERENCE_FREE = {"simpo"}


@dataclass
class PairStats:
    pi_w: torch.Tensor
    pi_l: torch.Tensor
    n_w: torch.Tensor
    n_l: torch.Tensor
    ref_w: torch.Tensor | None = None
    ref_l: torch.Tensor | None = None
    kl_w: torch.Tensor | None = None
    kl_l: torch.Tensor | None = None


def preference_loss(
    kind: str, s: PairStats, *, beta: float, alpha: float = 0.0, gamma: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen implicit rewards, rejected implicit rewards), each (B,)."""
    if kind == "simpo":
        r_w, r_l = beta * s.pi_w / s.n_w, beta * s.pi_l / s.n_l
        return -F.logsigmoid(r_w - r_l - gamma), r_w.detach(), r_l.detach()
    assert s.ref_w is not None and s.ref_l is not None, f"{kind} needs reference log-probs"
    ratio_w, ratio_l = s.pi_w - s.ref_w, s.pi_l - s.ref_l
    r_w, r_l = (beta * ratio_w).detach(), (beta * ratio_l).detach()
    if kind == "dpo":
        losses = -F.logsigmoid(beta * (ratio_w - ratio_l))
    elif kind == "ipo":
        losses = (ratio_w / s.n_w - ratio_l / s.n_l - 1.0 / (2.0 * beta)) ** 2
    elif kind == "rdpo":
        losses = -F.logsigmoid(beta * (ratio_w - ratio_l) + alpha * (s.n_w - s.n_l))
    elif kind == "tdpo":
        assert s.kl_w is not None and s.kl_l is not None, "tdpo needs the sequential KL terms"
        delta = beta * s.kl_l - (beta * s.kl_w).detach()
        losses = -F.logsigmoid(beta * (ratio_w - ratio_l) - alpha * delta)
    else:
        raise ValueError(f"unknown preference loss {kind!r}; choose one of {', '.join(LOSSES)}")
    return losses, r_w, r_l


def sequential_kl(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(B,) sum over masked positions of KL(pi_ref(.|s_t) || pi(.|s_t)), from (B, T, V) logits."""
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    logp = F.log_softmax(policy_logits.float(), dim=-1)
    per_token = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return (per_token * mask).sum(-1)
