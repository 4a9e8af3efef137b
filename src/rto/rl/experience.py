"""The RL batch as one object, and the scoring passes that fill it.

Shapes: B responses; P prompt columns (left-padded); T response columns (right-padded).
Every per-token tensor is (B, T) and aligned with the response tokens: entry [b, h] belongs to
token h of response b and is meaningful where response_mask[b, h] = 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from rto.data.tokenize import pad
from rto.models.generate import Samples


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T) right-padded
    response_mask: torch.Tensor  # (B, T) 1 up to and including EOS
    truncated: torch.Tensor  # (B,) no EOS generated
    # (B,) the response's group: the position of its prompt in the global rollout batch; the
    # rl.samples_per_prompt responses of a prompt are adjacent and on one process
    group: torch.Tensor | None = None
    logp_old: torch.Tensor | None = None  # (B, T) log pi_theta_old(y_h | ...)
    # (B, T) the sampler's own log-probs (vLLM's, at the sampling temperature), or None (hf: the
    # policy sampled itself)
    logp_sampler: torch.Tensor | None = None
    logp_ref: torch.Tensor | None = None  # (B, T) log pi_ref
    values: torch.Tensor | None = None  # (B, T) critic V(s_h) (GAE only)
    score: torch.Tensor | None = None  # (B,) reward model score (raw)
    token_sources: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, T) raw
    sentence: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) sentence rewards
    rewards: torch.Tensor | None = None  # (B, T) assembled token rewards
    sentence_reward: torch.Tensor | None = None  # (B,) their sentence part s_i (on the last token)
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T)
    texts: dict[str, list[Any]] = field(default_factory=dict)  # prompts, responses, gold

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """Row indices of consecutive chunks of at most `size` responses (a scoring pass's
        batches), on the rollout's device."""
        for start in range(0, len(self), size):
            yield torch.arange(start, min(start + size, len(self)), device=self.response_ids.device)

    def take(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors of rows `idx` (an update minibatch)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[idx]
        return out


def merge_samples(chunks: list[Samples], pad_id: int) -> Rollout:
    """Concatenate generation chunks of different widths into one padded rollout."""
    prompts = [
        row[m.bool()].tolist() for c in chunks for row, m in zip(c.prompt_ids, c.prompt_mask)
    ]
    responses = [row.tolist() for c in chunks for row in c.response_ids]
    resp_masks = [row.tolist() for c in chunks for row in c.response_mask]
    prompt_ids, prompt_mask = pad(prompts, pad_id, side="left")
    lengths = [sum(m) for m in resp_masks]
    response_ids, response_mask = pad(
        [r[:n] for r, n in zip(responses, lengths)], pad_id, side="right"
    )
    if response_ids.shape[1] == 0:
        response_ids = torch.full((len(prompts), 1), pad_id, dtype=torch.long)
        response_mask = torch.zeros_like(response_ids)
    truncated = torch.cat([c.truncated.cpu() for c in chunks])
    r = Rollout(prompt_ids, prompt_mask, response_ids, response_mask, truncated)
    if all(c.logprobs is not None for c in chunks):
        rows = [row.tolist() for c in chunks for row in c.logprobs.cpu()]
        rows = [row[:n] for row, n in zip(rows, lengths)]
        width = response_ids.shape[1]
        r.logp_sampler = torch.tensor([row + [0.0] * (width - len(row)) for row in rows],
                                      dtype=torch.float32).reshape(len(rows), width)  # fmt: skip
    return r


def to_device(r: Rollout, device: torch.device) -> Rollout:
    for f in fields(r):
        v = getattr(r, f.name)
        if isinstance(v, torch.Tensor):
            setattr(r, f.name, v.to(device))
    return r


@torch.no_grad()
def score_rollout(r: Rollout, roles: Any, *, batch_size: int, temperature: float) -> None:
    """Fill logp_old, logp_ref, values and score, asking `roles` (rl/roles.py) in chunks of
    `batch_size` rows; the score is the reward model's (raw), 0 without one.

    The KL penalty compares policy and reference at the sampling temperature. A reward model
    with its own tokenizer reads r.texts' prompt values and decoded responses."""
    names = ("logp_old", "logp_ref", "values", "score")
    outputs: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for start in range(0, len(r), batch_size):
        rows = slice(start, min(start + batch_size, len(r)))
        b = r.take(torch.arange(rows.start, rows.stop, device=r.response_ids.device))
        outputs["logp_old"].append(roles.logprobs("policy", b, temperature))
        outputs["logp_ref"].append(roles.logprobs("ref", b, temperature))
        if roles.has("critic"):
            outputs["values"].append(roles.values(b))
        if roles.has("reward"):
            prompts, responses = r.texts.get("prompt_values"), r.texts.get("responses")
            outputs["score"].append(
                roles.score(b, prompts and prompts[rows], responses and responses[rows])
            )
    for k, parts in outputs.items():
        if parts:
            setattr(r, k, torch.cat(parts).float())
    if r.score is None:
        r.score = torch.zeros(len(r), device=r.response_ids.device)
