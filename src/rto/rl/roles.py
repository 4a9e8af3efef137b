"""The five RL roles behind one object: policy, reference, DPO model, reward model, critic.

The scorer and the update never hold models; they ask by role: "log-probs of these tokens
under `ref`", "values", "score". How the roles are laid out in memory is the layout's business,
so reward maths and the loop do not change with it. `SeparateModels` holds one model per role;
`rl.shared_base.SharedBase` (LoRA) one frozen base with named adapters (policy, dpo, reward,
critic; ref = adapters off) and answers the same questions.

A batch is a dict of the RL layout's tensors (`Rollout.take`): prompt_ids / prompt_mask (B, P)
left-padded, response_ids / response_mask (B, T) right-padded. Only the trainable roles
(`policy`, `critic`) are handed to accelerate and get optimisers.
"""

from __future__ import annotations

from typing import Any

import torch

from rto.rl.experience import critic_values, policy_logprobs

LOGPROB_ROLES = ("policy", "ref", "dpo")


class SeparateModels:
    """One model per role (the reward model wrapped in `models.reward_model.RewardModel`)."""

    layout = "separate models"

    def __init__(self, *, policy: Any, ref: Any, dpo: Any | None = None, critic: Any | None = None,
                 reward_model: Any | None = None):  # fmt: skip
        self.policy, self.ref, self.dpo = policy, ref, dpo
        self.critic, self.reward_model = critic, reward_model

    def describe(self) -> str:
        return "separate models, one per role"

    def trained_parameters(self) -> tuple[list[Any], list[Any]]:
        """(the policy's, the critic's) parameters that train (one optimiser group each)."""
        return tuple(  # type: ignore[return-value]
            [] if m is None else [p for p in m.parameters() if p.requires_grad]
            for m in (self.policy, self.critic)
        )

    def has(self, role: str) -> bool:
        """Whether `role` (policy, ref, dpo, reward, critic) is there."""
        return getattr(self, "reward_model" if role == "reward" else role) is not None

    def logprobs(
        self, role: str, batch: dict[str, torch.Tensor], temperature: float = 1.0
    ) -> torch.Tensor:
        """(B, T) log-probs of the response tokens under `role` at `temperature`."""
        return self.logprobs_and_logits(role, batch, temperature)[0]

    def logprobs_and_logits(
        self, role: str, batch: dict[str, torch.Tensor], temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) log-probs and the (B, T, V) logits they came from (the update's entropy)."""
        if role not in LOGPROB_ROLES or not self.has(role):
            raise ValueError(f"no log-probs for role {role!r} in this run")
        return policy_logprobs(getattr(self, role), batch, temperature)

    def values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) critic values V(s_h), read at the position that predicts response token h."""
        return critic_values(self.critic, batch["prompt_ids"], batch["prompt_mask"],
                             batch["response_ids"], batch["response_mask"])  # fmt: skip

    def score(self, batch: dict[str, torch.Tensor], prompts: list[Any] | None = None,
              responses: list[str] | None = None) -> torch.Tensor:  # fmt: skip
        """(B,) raw reward-model scores; `prompts` (as the rows held them) and `responses`
        (decoded) are read when the reward model has its own tokenizer."""
        return self.reward_model.score(batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                       batch["response_mask"], prompts, responses)  # fmt: skip
