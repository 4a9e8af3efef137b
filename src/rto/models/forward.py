"""Forward passes every stage shares: token log-probabilities, entropies, and scores read from
a sequence-classification model at every position or at the last real token.

Padding may be on either side: positions are always computed from the attention mask, so a
left-padded row gets the same positions (and the same numbers) as the unpadded sequence.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last 1 in each row of a 0/1 mask (0 for an all-zero row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).argmax(dim=1)


def gather_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / T)[targets], computed in float32 without a (B, L, V) log-softmax copy."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def causal_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, last: int = 0
) -> torch.Tensor:
    """(B, L, V) logits, or with `last` > 0 those of the last `last` positions only: the model
    applies its output layer (and whatever follows it, e.g. logit soft-capping) to those hidden
    states alone (transformers' `logits_to_keep`), so the (B, L, V) tensor is never made. A model
    whose forward does not take `logits_to_keep` gets the whole sequence's logits, sliced."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids(attention_mask), use_cache=False)  # fmt: skip
    if last > 0:
        # the slice also covers a forward that takes **kwargs and ignores logits_to_keep; a forward
        # without it raises TypeError where it binds its arguments, before its layers run
        try:
            return model(**kwargs, logits_to_keep=last).logits[:, -last:]
        except TypeError as e:
            if "logits_to_keep" not in str(e):
                raise
    logits = model(**kwargs).logits
    return logits[:, -last:] if last > 0 else logits


def response_logits(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """(B, T, V) logits predicting each response token, for the RL layout: prompts left-padded
    to P columns, responses right-padded to T columns. Only the T + 1 last positions go through
    the output layer: with a 49k-128k vocabulary, logits of the prompt's positions (and, in the
    update, their gradients) would be memory spent on nothing."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    t = response_ids.shape[1]
    return causal_logits(model, ids, mask, last=t + 1)[:, :-1]


def response_logprobs(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(B, T) log-prob of each response token under `model`, zero outside the response mask."""
    logits = response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask)
    return gather_logprobs(logits, response_ids, temperature) * response_mask


class TokenScorer(nn.Module):
    """A sequence-classification model (one output) read at every position: (B, L) scores.

    Reward models and critics both use it: the reward is the score at the last real token, the
    critic's values are the scores at every position. Wrapping the whole model in one module
    keeps DDP / DeepSpeed / FSDP wrapping correct (the forward goes through the wrapper).
    """

    def __init__(self, hf_model: Any):
        super().__init__()
        self.hf = hf_model  # a Hugging Face model, or a peft model around one (LoRA)

    @property
    def model(self) -> Any:
        """The Hugging Face model (inside a peft model, its LoRA layers injected)."""
        return self.hf.get_base_model() if hasattr(self.hf, "get_base_model") else self.hf

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = self.model
        return head_scores(backbone_of(model), model.score, input_ids, attention_mask)


def backbone_of(model: Any) -> Any:
    """The transformer body of a Hugging Face causal LM or sequence classifier (no output layer,
    no score head): both name it by base_model_prefix (`model`, GPT-2's `transformer`)."""
    return getattr(model, model.base_model_prefix)


def head_scores(
    backbone: Any, head: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, L) head(last hidden state) at every position, in float32."""
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    ).last_hidden_state
    head_dtype = next(head.parameters()).dtype  # a LoRA head trains in float32
    return head(hidden.to(head_dtype)).squeeze(-1).float()


def sequence_scores(
    scorer: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B,) score at the last real token of each row, whatever the padding side."""
    scores = scorer(input_ids, attention_mask)
    idx = last_real_index(attention_mask)
    return scores.gather(1, idx.unsqueeze(1)).squeeze(1)
