"""Sampling responses: left-padded prompts in, (B, T) responses with a mask out.

Every stage that samples (SFT's held-out metrics, `rto pairs`, the RL rollout, `rto eval`)
goes through `sample`, so a response means the same everywhere: the tokens up to and including
the first stop token (EOS or the chat template's end of turn, `stop_ids`); a response that
reached `max_new_tokens` without one is marked truncated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rto.data.formats import end_of_turn
from rto.data.tokenize import pad


@dataclass
class Samples:
    """One batch of sampled responses.

    prompt_ids, prompt_mask:     (B, P)  left-padded prompts
    response_ids, response_mask: (B, T)  right-padded responses; mask 1 up to and including EOS
    truncated:                   (B,)    True where no EOS was generated
    logprobs:                    (B, T)  the sampler's own log-probs of the response tokens, when
                                         the backend reports them (vLLM), else None
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    truncated: torch.Tensor
    logprobs: torch.Tensor | None = None


def stop_ids(tokenizer: Any, model: Any | None = None) -> list[int]:
    """Tokens that end a response: the EOS, the chat template's end-of-turn token (the same
    token that closes replies in training data, `formats.end_of_turn`) and the model's
    generation_config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    turn_end = end_of_turn(tokenizer)
    if turn_end is not None:
        ids.add(turn_end[1])
    gen_cfg = getattr(model, "generation_config", None) if model is not None else None
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(extra)
    return sorted(i for i in ids if i is not None)


def response_mask_from_ids(
    response_ids: torch.Tensor, eos: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, truncated): mask keeps tokens up to and including the first EOS of each row."""
    is_eos = torch.isin(response_ids, torch.tensor(eos, device=response_ids.device))
    seen_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    mask = (~seen_before).long()
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


@torch.no_grad()
def sample(
    model: Any,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    device: torch.device | str = "cpu",
    seeds: list[int] | None = None,
) -> Samples:
    """`seeds` (one per prompt, see rto.models.seeded) makes each response a function of its own
    seed, whatever the batch and the process it is generated in; without them, sampling draws
    from torch's global random stream."""
    from transformers import GenerationConfig

    prompt_ids, prompt_mask = pad(prompts, pad_id, side="left")
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    greedy = temperature == 0
    seeded = seeds is not None and not greedy
    gen_cfg = GenerationConfig(
        do_sample=not greedy and not seeded,  # seeded: argmax over Gumbel-perturbed scores
        temperature=None if greedy or seeded else temperature,
        top_p=None if greedy or seeded else top_p,
        top_k=None if greedy or seeded or not top_k else top_k,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad_id,
        use_cache=True,
    )
    extra: dict[str, Any] = {}
    if seeded:
        from rto.models.seeded import seeded_processors

        assert seeds is not None and len(seeds) == len(prompts), "one seed per prompt"
        extra["logits_processor"] = seeded_processors(
            seeds, prompt_ids.shape[1], temperature=temperature, top_p=top_p, top_k=top_k,
            device=prompt_ids.device,
        )  # fmt: skip
    was_training = model.training
    model.eval()
    out = model.generate(  # never synced_gpus: rto generates with whole weights on each process
        input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_cfg,
        synced_gpus=False, **extra,
    )  # fmt: skip
    if was_training:
        model.train()
    response_ids = out[:, prompt_ids.shape[1] :]
    if response_ids.shape[1] == 0:  # nothing generated at all (max_new_tokens reached at once)
        response_ids = torch.full(
            (len(prompts), 1), pad_id, dtype=torch.long, device=prompt_ids.device
        )
    mask, truncated = response_mask_from_ids(response_ids, eos)
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    return Samples(prompt_ids, prompt_mask, response_ids, mask, truncated)


class Generator:
    """`sample(prompts, seeds) -> Samples` for left-padded token-id prompts, one seed each;
    `load_weights(model)` before each rollout; `close()` when the stage is done with it. With
    `report_logprobs` set, a backend whose sampler is not the policy itself (vLLM) also returns
    the log-probs it sampled with (`Samples.logprobs`)."""

    backend = ""

    def __init__(self, settings: Any, *, tokenizer: Any, eos: list[int], device: Any):
        self.settings = settings  # a config.sections.GenerateSection
        self.pad_id = tokenizer.pad_token_id
        self.eos = eos
        self.device = device
        self.report_logprobs = False

    def load_weights(self, model: Any) -> None:
        raise NotImplementedError

    def sample(self, prompts: list[list[int]], seeds: list[int] | None) -> Samples:
        raise NotImplementedError

    def sleep(self) -> None:
        """Free device memory until the next `load_weights` / `sample` (vLLM's sleep mode on a
        GPU, generate.vllm_sleep); nothing for the others."""

    def close(self) -> None:
        """Free what the generator holds (a vLLM engine's memory)."""


class HFGenerator(Generator):
    """transformers' generate on the model last given to `load_weights` (no copy is made)."""

    backend = "hf"

    def __init__(self, settings: Any, *, tokenizer: Any, eos: list[int], device: Any,
                 model: Any | None = None):  # fmt: skip
        super().__init__(settings, tokenizer=tokenizer, eos=eos, device=device)
        self.model = model

    def load_weights(self, model: Any) -> None:
        self.model = model

    def sample(self, prompts: list[list[int]], seeds: list[int] | None) -> Samples:
        g = self.settings
        return sample(
            self.model, prompts, pad_id=self.pad_id, eos=self.eos, max_new_tokens=g.max_new_tokens,
            temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, device=self.device, seeds=seeds,
        )  # fmt: skip


def decode_responses(tokenizer: Any, samples: Samples, eos: list[int]) -> list[str]:
    """Response texts without the EOS token."""
    texts = []
    for ids, mask in zip(samples.response_ids.tolist(), samples.response_mask.tolist()):
        kept = [t for t, m in zip(ids, mask) if m and t not in eos]
        texts.append(tokenizer.decode(kept, skip_special_tokens=False))
    return texts
