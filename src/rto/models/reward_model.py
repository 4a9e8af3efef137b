"""A reward model and how it reads a policy's samples, whatever its tokenizer.

Same tokenizer as the policy (a reward model from `rto rm` on the SFT model): the policy's
token ids go in as they are, and the score is read at the last real token (the fast path, no
re-tokenisation). Another tokenizer (an off-the-shelf reward model): the prompt, as the data
row held it (a string or chat messages), and the decoded response are rendered with the reward
model's own chat template and tokenizer, exactly as `rto rm` renders a preference row
{prompt, chosen: response}, and scored there. Either way the caller places the score on the
policy's last response token.
"""

from __future__ import annotations

from typing import Any

import torch

from rto.data.formats import ChatRenderer
from rto.data.tokenize import encode_scored, pad
from rto.models.forward import Layout, TokenScorer, sequence_scores
from rto.models.load import load_sequence_scorer, load_tokenizer, tokenizer_fingerprint


def max_positions(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class RewardModel:
    """score(prompt_ids, ..., prompts, responses) -> (B,) raw scores of policy samples."""

    def __init__(self, scorer: Any, tokenizer: Any, *, same_tokenizer: bool, path: str,
                 chat_prompts: bool | str = "auto"):  # fmt: skip
        self.scorer, self.tokenizer, self.path = scorer, tokenizer, path
        self.same_tokenizer = same_tokenizer
        self.render = None if same_tokenizer else ChatRenderer(tokenizer, path, chat_prompts)
        self.max_length = max_positions(getattr(scorer, "config", None))
        self.truncated = 0  # re-rendered samples cut to the reward model's positions

    def describe(self) -> str:
        if self.same_tokenizer:
            return (
                f"reward model {self.path}: the policy's tokenizer (token ids passed as they are)"
            )
        how = "its chat template" if self.render.wrap_strings else "plain text (no chat template)"
        return (f"reward model {self.path}: its own tokenizer; prompts and decoded responses are "
                f"re-rendered with {how} and scored there")  # fmt: skip

    def check_prompts(self, prompts: list[Any]) -> None:
        """Render every prompt once with the reward model's template, so that a prompt it
        cannot read (chat messages and no chat template) is refused before training."""
        if self.render is not None:
            encode_scored(self.tokenizer, self.render, prompts, [""] * len(prompts))

    @torch.no_grad()
    def score(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        prompts: list[Any] | None = None,
        responses: list[str] | None = None,
    ) -> torch.Tensor:
        """(B,) scores. `prompts` (as the rows held them) and `responses` (decoded texts) are
        needed only when the reward model has its own tokenizer."""
        if self.same_tokenizer:
            ids = torch.cat([prompt_ids, response_ids], dim=1)
            mask = torch.cat([prompt_mask, response_mask], dim=1)
            return sequence_scores(self.scorer, ids, mask)
        assert prompts is not None and responses is not None
        seqs, cut = encode_scored(
            self.tokenizer, self.render, prompts, responses, max_length=self.max_length
        )
        self.truncated += cut
        ids, mask = pad(seqs, self.tokenizer.pad_token_id, side="right")
        device = response_ids.device
        return sequence_scores(self.scorer, ids.to(device), mask.to(device))


def load_reward_model(section: Any, path: str, policy_tokenizer: Any, *, chat_prompts: bool | str,
                      device: Any) -> RewardModel:  # fmt: skip
    """The reward model at `path`, frozen, with dropout off, on `device`; it reads the policy's
    token ids when it shares the policy's tokenizer, re-rendered text otherwise."""
    tokenizer = load_tokenizer(section, path=path)
    same = tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(policy_tokenizer)
    hf = load_sequence_scorer(
        section, path, trainable=False, require_head=True, role="reward model"
    )
    return RewardModel(TokenScorer(hf, Layout.of(section)).to(device), tokenizer, same_tokenizer=same, path=path,
                       chat_prompts=chat_prompts)  # fmt: skip
