"""Sampling whose randomness belongs to each response, not to the batch it was generated in.

`torch.multinomial` draws from one random stream for the whole batch, so a response depends on
which other prompts shared its batch, and on how many processes split the prompts. Here every
row gets its own seed (from the run's seed and the prompt's global position) and sampling uses
the Gumbel-max trick: argmax_v (log p_v + G_v) with G_v = -log(-log U_v) is an exact sample from
p, and U is a counter-based hash of (row seed, step, token id) computed with integer tensor ops,
so the same row draws the same tokens whatever its batch, its process, or its device.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

_MASK64 = (1 << 64) - 1


# The run's random streams other than sampling, each derived from the run's seed by its own salt:
# seed * salt + index (index: the epoch, the RL iteration). Salts are primes far apart, so two
# streams of one run, or one stream of two nearby seeds, never share a seed in practice.
STREAM_SALTS = {
    "epoch_order": 1_000_003,  # the permutation of the training examples in each epoch
    "minibatch_order": 100_003,  # the order of a rollout's responses in each PPO epoch
}


def stream_seed(seed: int, stream: str, index: int) -> int:
    """The seed of random stream `stream` (STREAM_SALTS) at `index` for run seed `seed`."""
    return seed * STREAM_SALTS[stream] + index


def row_seed(*keys: int) -> int:
    """A 63-bit seed from integers (run seed, iteration, prompt index, sample ...)."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _to_signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_GOLDEN = _to_signed(0x9E3779B97F4A7C15)
_MIX1 = _to_signed(0xBF58476D1CE4E5B9)
_MIX2 = _to_signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x * _GOLDEN  # int64 products wrap around: exact modular arithmetic on every device
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniform(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(B, V) uniforms in (0, 1), a pure function of (seed of row b, step, token id v)."""
    device = seeds.device
    key = _splitmix64(seeds.view(-1, 1) + _splitmix64(torch.tensor([step], device=device)))
    bits = _splitmix64(key + torch.arange(vocab, device=device, dtype=torch.long).view(1, -1))
    top53 = _shr(bits, 11).double()
    return (top53 + 0.5) / float(1 << 53)


class GumbelSampler:
    """A logits processor that turns greedy decoding into per-row seeded sampling: it adds
    Gumbel noise to the (already temperature-scaled, top-k / top-p filtered) scores."""

    def __init__(self, seeds: list[int], prompt_width: int, device: Any):
        self.seeds = torch.tensor(seeds, dtype=torch.long, device=device)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        u = uniform(self.seeds.to(scores.device), step, scores.shape[-1])
        gumbel = -torch.log(-torch.log(u))
        return scores.double() + gumbel  # in float64: no ties created by rounding


def seeded_processors(
    seeds: list[int],
    prompt_width: int,
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    device: Any,
) -> Any:
    """The warpers `generate` applies when sampling, then the seeded Gumbel noise."""
    from transformers import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors: list[Any] = []
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p))
    processors.append(GumbelSampler(seeds, prompt_width, device))
    return LogitsProcessorList(processors)
