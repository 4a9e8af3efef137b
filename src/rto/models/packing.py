"""The one place that decides a forward pass's batch shape: padded rectangles, or packed rows.

A batch of sequences of uneven length comes in padded, (B, L) ids with a 0/1 attention mask
(padding on either side; a row's real tokens are contiguous). Padding-free (`Layout`), its real
tokens are packed into rows as wide as its longest sequence, each sequence whole inside one
row (first fit, longest first), with positions restarting at 0 for every sequence and no
attention mask: transformers then reads the sequence boundaries from the positions and lets a
token attend only within its own sequence (`masking_utils.find_packed_sequence_indices`; its
flash-attention path cuts the rows at the same boundaries). The linear layers then run on real
tokens only (and a row's unused tail), attention on at most a row's width.

`Packing` remembers where each real token went, so per-token results come back in the padded
layout the caller gave, and nothing above this file sees the packed rows.

Whether an architecture reads packed rows correctly is checked once per architecture
(`packs_correctly`, on two short sequences, the same on every process): its packed pass must
give its padded pass's hidden states. One that does not is said in one line and run padded.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Layout:
    """How forward passes lay out sequences of uneven length (config model.padding_free,
    model.logit_chunk).

    padding_free  pack real tokens into rows (above); False: padded rectangles
    logit_chunk   compute token log-probs and entropies from hidden states in chunks of this
                  many positions, the output layer applied per chunk and again in backward
                  (models/forward.py); 0: the model's own output layer over every position
                  asked for at once"""

    padding_free: bool = True
    logit_chunk: int = 256

    @classmethod
    def of(cls, section: Any) -> Layout:
        """The layout a model section asks for (its padding_free and logit_chunk)."""
        return cls(section.padding_free, section.logit_chunk)


PADDED = Layout(padding_free=False, logit_chunk=0)  # what rto did before: the reference layout


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a padded batch counted over real tokens only, whatever the padding side."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Packing:
    """Real tokens of a padded (B, L) batch, packed into (R, W) rows.

    ids, positions   (R, W) the packed rows and their positions (restarting per sequence; a
                     row's unused tail is a sequence of its own, whose outputs nobody reads)
    src, dst         (N,) for each real token in order: its flat index in the padded (B, L)
                     batch and in the packed (R, W) rows"""

    ids: torch.Tensor
    positions: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    shape: tuple[int, int]

    def packed_index(self) -> torch.Tensor:
        """(B * L,) the flat packed index of each padded position; -1 where it is padding."""
        index = torch.full(
            (self.shape[0] * self.shape[1],), -1, dtype=torch.long, device=self.src.device
        )
        index[self.src] = self.dst
        return index

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """(R, W, ...) per-token values back to the padded (B, L, ...) layout, 0 at padding."""
        flat = values.reshape(-1, *values.shape[2:])[self.dst]
        out = flat.new_zeros((self.shape[0] * self.shape[1], *values.shape[2:]))
        out = out.index_put((self.src,), flat)
        return out.reshape(*self.shape, *values.shape[2:])


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int = 0) -> Packing:
    """The real tokens of a padded batch in rows as wide as its longest sequence (or `width`;
    module docstring). Deterministic: longest sequences first (ties in batch order), each into
    the first row with room."""
    device = input_ids.device
    mask = attention_mask.bool()
    lengths = mask.sum(1).tolist()
    width = max(width, max(lengths), 1)
    rows: list[list[int]] = []  # the batch rows packed into each packed row, in order
    room: list[int] = []
    for b in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if not lengths[b]:
            continue
        for r, free in enumerate(room):
            if free >= lengths[b]:
                rows[r].append(b)
                room[r] -= lengths[b]
                break
        else:
            rows.append([b])
            room.append(width - lengths[b])
    starts = mask.long().argmax(1).tolist()  # a row's real tokens are contiguous
    seq_len = input_ids.shape[1]
    src, dst, positions = [], [], torch.zeros((max(len(rows), 1), width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for b in members:
            n = lengths[b]
            src.extend(range(b * seq_len + starts[b], b * seq_len + starts[b] + n))
            dst.extend(range(r * width + at, r * width + at + n))
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)  # the tail: a sequence of its own
    src_t = torch.tensor(src, dtype=torch.long, device=device)
    dst_t = torch.tensor(dst, dtype=torch.long, device=device)
    ids = torch.zeros(positions.shape, dtype=input_ids.dtype, device=device)
    ids.view(-1)[dst_t] = input_ids.reshape(-1)[src_t]
    return Packing(ids, positions.to(device), src_t, dst_t, (input_ids.shape[0], seq_len))


# --------------------------------------------------------------------------- the check, once per architecture

_CHECKED: dict[tuple[str, str, str], bool] = {}


def _key(model: Any) -> tuple[str, str, str]:
    config = model.config
    attention = str(getattr(config, "_attn_implementation", None) or "default")
    dtype = str(next(model.parameters()).dtype)
    return type(model).__name__, attention, dtype


def _tolerance(dtype: torch.dtype) -> float:
    """How far a packed pass may be from a padded one (relative to the values' scale): float
    rounding of other matrix shapes, not a sequence that sees another one (an error of order 1)."""
    return 1e-3 if dtype == torch.float32 else 5e-2


def probe_rows(model: Any, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Two short sequences of token ids every model has, right-padded: the checks' input. The
    same on every process, so a check runs, and decides, alike everywhere (under ZeRO-3 a pass
    is a collective step)."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 16)
    ids = torch.tensor([[3, 5, 7, 9, 11, 13], [4, 6, 8, 10, 0, 0]]) % max(vocab - 1, 2) + 1
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return ids.to(device), mask.to(device)


@torch.no_grad()
def packs_correctly(backbone: Any, model: Any) -> bool:
    """Whether `backbone` (the body of `model`) gives packed rows the hidden states of padded
    ones, tried once per architecture, attention kernel and dtype on `probe_rows`; one that does
    not is said once, and its passes stay padded."""
    key = _key(model)
    if key not in _CHECKED:
        with evaluating(model):
            _CHECKED[key] = _check(key, backbone, model)
    return _CHECKED[key]


@contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """`model` in eval mode for a check (a model trained with its dropout draws none in it)."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _check(key: tuple[str, str, str], backbone: Any, model: Any) -> bool:
    ids, mask = probe_rows(model, next(model.parameters()).device)
    padded = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                      use_cache=False).last_hidden_state  # fmt: skip
    packing = pack(ids, mask, width=int(mask.sum()))  # both in one row: the second after the first
    packed = backbone(input_ids=packing.ids, attention_mask=None, position_ids=packing.positions,
                      use_cache=False).last_hidden_state  # fmt: skip
    packed = packing.unpack(packed)
    real = mask.bool()
    scale = float(padded[real].abs().max()) + 1.0
    gap = float((packed[real] - padded[real]).abs().max())
    ok = gap <= _tolerance(padded.dtype) * scale
    if not ok:
        print(f"[rto] {key[0]} ({key[1]} attention, {key[2]}) does not read packed rows as separate "
              f"sequences (hidden states {gap:.3g} from the padded pass's): its forward passes stay "
              "padded (model.padding_free has no effect on it)", file=sys.stderr, flush=True)  # fmt: skip
    return ok
