"""Reward assembly: the RTO per-token reward as one pure function.

For every response token h = 1..H (H = the last real token: the EOS when one was generated, the
last token otherwise), RTO paper section 4:

    r_h = clamp(beta1 * (log pi_dpo(y_h|x,y_<h) - log pi_ref(y_h|x,y_<h)), -c, c)   dense DPO reward
        - beta2 * (log pi_theta(y_h|x,y_<h) - log pi_ref(y_h|x,y_<h))                 KL penalty
        + [h == H] * beta3 * score(x, y)                                              sentence score

with beta1 = rl.dpo_reward.scale, beta2 = rl.kl.coef, beta3 = rl.score.coef and c = rl.dpo_reward.clip (no
clamp when None; the paper has none, the authors' code clamps at 0.05). The score is the reward
model's, normalised (`normalize_score`). The variants only move the DPO term:

    granularity token     as above (rto)
    granularity segment   each sentence's DPO rewards summed onto its last token (semi_rto)
    granularity sequence  all DPO rewards summed onto the last token (ddpo)
    shaping               subtract the summed DPO reward at the last token, so the return of a
                          whole response is the score minus KL, as in PPO (rs_ppo)

The DPO log-ratio is one token-reward source among others (`rl/sources.py`): every source s
gives a (B, T) value x^s per policy response token and enters the same way, with its own
coefficient, clip, granularity and shaping; sentence rewards k (a reward function) add to the
score on the last token with their own weight w_k:

    r_h = sum_s place_s(clamp(beta_s * x^s_h, -c_s, c_s)) - beta2 * kl_h
        + [h == H] * (beta3 * score(x, y) + sum_k w_k * f_k(x, y))

A coefficient of 0 removes its term exactly: it is never multiplied in, so beta1 = 0 is
standard PPO and a missing or non-finite value of a switched-off source cannot leak in.

All tensors are (B, T) over response positions with a 0/1 `mask` that is 1 on a contiguous
prefix of each row (right padding); the score is (B,). Values outside the mask are ignored,
whatever they are (NaN included).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rto.models.forward import last_real_index


@dataclass
class SourceSettings:
    """How one token-reward source enters the reward (the DPO source: beta1 and its options)."""

    scale: float = 1.0  # beta_s
    clip: float | None = None  # c_s (None = no clip)
    granularity: str = "token"  # token | segment | sequence
    shaping: bool = False  # subtract the source's sum at the last token


@dataclass
class RewardSettings:
    """The terms every run has: the KL penalty and the sentence score."""

    kl_coef: float = 0.01  # beta2
    score_coef: float = 1.0  # beta3
    kl_in_reward: bool = True  # False (rl.kl.in_loss): the KL is a loss term, not in r_h at all


@dataclass
class RunningMoments:
    """Running mean / std of reward-model scores (rl.score.normalization running)."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        n = float(x.numel())
        if n == 0:
            return
        batch_mean = float(x.mean())
        batch_m2 = float(((x - batch_mean) ** 2).sum())
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / max(self.count - 1, 1)) or 1.0


def normalize_score(
    score: torch.Tensor,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    clamp: float | None = 10.0,
    truncated: torch.Tensor | None = None,
    missing_eos_penalty: float | None = None,
) -> torch.Tensor:
    """(score - mean) / std, minus the penalty for responses without EOS, clamped to +-clamp."""
    out = (score.float() - mean) / std
    if missing_eos_penalty and truncated is not None:
        out = out - missing_eos_penalty * truncated.float()
    if clamp is not None:
        out = out.clamp(-clamp, clamp)
    return out


def place_at_last(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A (B, T) tensor that is zero except values[b] at the last real token of row b."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=mask.device)
    return out.scatter(1, last_real_index(mask).unsqueeze(1), values.unsqueeze(1)) * mask.any(
        dim=1, keepdim=True
    )


def segment_sums(
    per_token: torch.Tensor, mask: torch.Tensor, segment_end: torch.Tensor
) -> torch.Tensor:
    """Sum each segment's values onto its last token. A segment ends at a token with
    segment_end = 1, or at the last real token of the row."""
    ends = (segment_end.bool() & mask.bool()) | (
        place_at_last(torch.ones(mask.shape[0], device=mask.device), mask) > 0
    )
    # segment id of every position: number of ends strictly before it
    seg_id = ends.long().cumsum(1) - ends.long()
    totals = torch.zeros_like(per_token).scatter_add(
        1, seg_id, per_token.masked_fill(~mask.bool(), 0.0)
    )
    return torch.where(ends, totals.gather(1, seg_id), torch.zeros_like(per_token))


def source_term(
    values: torch.Tensor,
    mask: torch.Tensor,
    settings: SourceSettings,
    segment_end: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a source's reward as placed by its granularity, its per-token reward before placing):
    per_token_h = clamp(beta_s * x_h, -c_s, c_s) on real tokens."""
    per_token = settings.scale * values
    if settings.clip is not None:
        per_token = per_token.clamp(-settings.clip, settings.clip)
    per_token = per_token.masked_fill(~mask.bool(), 0.0)
    if settings.granularity == "token":
        placed = per_token
    elif settings.granularity == "sequence":
        placed = place_at_last(per_token.sum(1), mask)
    elif settings.granularity == "segment":
        if segment_end is None:
            raise ValueError(
                "granularity 'segment' needs segment_end (the sentence delimiter tokens)"
            )
        placed = segment_sums(per_token, mask, segment_end)
    else:
        raise ValueError(f"unknown granularity {settings.granularity!r}")
    if settings.shaping:
        placed = placed - place_at_last(per_token.sum(1), mask)
    return placed, per_token


RESERVED = ("kl", "score")


def token_rewards(
    mask: torch.Tensor,
    logp_policy: torch.Tensor,
    logp_ref: torch.Tensor,
    score: torch.Tensor,
    settings: RewardSettings,
    *,
    segment_end: torch.Tensor | None = None,
    sources: Mapping[str, tuple[torch.Tensor, SourceSettings]] | None = None,
    sentence: Mapping[str, tuple[torch.Tensor, float]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(rewards (B, T), parts).

    `sources` maps token-reward source names to their (B, T) values and settings, in the order
    they are added (RTO's: {"dpo": (log pi_dpo - log pi_ref, SourceSettings(beta1, ...))}),
    `sentence` maps sentence-reward names to their (B,) values and
    weight. parts holds, per source, its placed reward NAME and NAME_per_token (B, T); 'kl' (the
    per-token log-ratio of policy to reference, (B, T)); 'score' ((B,), after beta3) and each
    sentence reward ((B,), after its weight)."""
    mask = mask.float()
    kl = (logp_policy - logp_ref).masked_fill(~mask.bool(), 0.0)
    score_part = settings.score_coef * score.float()
    rewards = place_at_last(score_part, mask)
    if settings.kl_in_reward:
        rewards = -settings.kl_coef * kl + rewards
    parts = {"kl": kl, "score": score_part}
    dense = dict(sources or {})
    clash = [n for n in [*dense, *(sentence or {})] if n in RESERVED or n.endswith("_per_token")]
    if clash or (sentence and set(sentence) & set(dense)):
        raise ValueError(
            f"reward names must be unique and not {RESERVED}: {clash or sorted(set(sentence) & set(dense))}"
        )
    for name, (values, source_settings) in dense.items():
        if source_settings.scale == 0.0:  # removed exactly, whatever its values
            continue
        placed, per_token = source_term(values, mask, source_settings, segment_end)
        rewards = rewards + placed
        parts[name], parts[name + "_per_token"] = placed, per_token
    for name, (values, weight) in (sentence or {}).items():
        if weight == 0.0:
            continue
        parts[name] = weight * values.float()
        rewards = rewards + place_at_last(parts[name], mask)
    return rewards.masked_fill(~mask.bool(), 0.0), parts


def sentence_part(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B,) s_i: the sentence rewards of `token_rewards`' parts (the score after beta3, each
    sentence reward after its weight), summed: what the reward adds on the last token besides
    the token sources and the KL. The group estimators baseline it apart (rl/advantages.py)."""
    return sum(v for v in parts.values() if v.dim() == 1)  # type: ignore[return-value]


def reward_breakdown(
    parts: Mapping[str, torch.Tensor], kl_coef: float
) -> dict[str, tuple[float, float]]:
    """{component: (sum, share)} for each token source (before placing), the KL penalty
    (-beta2 * kl) and each sentence reward (the score included), from `token_rewards`' parts.

    sum   = mean over responses of the component's reward summed over the response;
    share = sum over responses and tokens of |its reward| / the same for all components: the
            part of the reward signal it gives (1 for a component that is all there is)."""
    per_response: dict[str, torch.Tensor] = {}
    magnitude: dict[str, torch.Tensor] = {}
    for name, value in parts.items():
        if name.endswith("_per_token"):
            per_response[name[: -len("_per_token")]] = value.sum(1)
            magnitude[name[: -len("_per_token")]] = value.abs().sum()
        elif name == "kl":
            penalty = -kl_coef * value
            per_response["kl"], magnitude["kl"] = penalty.sum(1), penalty.abs().sum()
        elif value.dim() == 1:
            per_response[name], magnitude[name] = value, value.abs().sum()
    total = float(sum(magnitude.values())) if magnitude else 0.0
    return {
        name: (
            float(per_response[name].float().mean()),
            float(magnitude[name]) / total if total else 0.0,
        )
        for name in per_response
    }
