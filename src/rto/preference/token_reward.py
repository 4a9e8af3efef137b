"""The DPO token reward (RTO paper, eq. for r_dpo):

    r_dpo(s_h, a_h) = beta * ( log pi_dpo(a_h | s_h) - log pi_ref(a_h | s_h) )

for every response token h. Under a token-level Bradley-Terry model this is the reward the DPO
policy is optimal for (the value terms cancel between two responses to the same prompt), which
is why RTO can hand it to PPO as a dense reward.
"""

from __future__ import annotations

from typing import Any

import torch

from rto.models.forward import response_logprobs


@torch.no_grad()
def dpo_token_rewards(
    dpo_model: Any,
    ref_model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """(B, T) DPO token rewards, zero outside the response mask.

    Layout: prompts left-padded (B, P), responses right-padded (B, T), as `rto.models.generate`
    returns them. The two models must share one tokenizer (`check_same_tokenizer`)."""
    logp_dpo = response_logprobs(dpo_model, prompt_ids, prompt_mask, response_ids, response_mask)
    logp_ref = response_logprobs(ref_model, prompt_ids, prompt_mask, response_ids, response_mask)
    return beta * (logp_dpo - logp_ref) * response_mask
