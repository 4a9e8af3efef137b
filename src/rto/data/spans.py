"""Where each response token sits in the response text: character spans, and back.

A user's token reward function reads a response as text and returns rewards per token or per
character span; rto needs them per policy token. `token_spans` gives every token of a sampled
response its characters, `rewards_on_tokens` maps per-span rewards back onto tokens.

The convention, whatever the tokenizer: the spans of a response's tokens are contiguous and
cover the response text (`decode` of its tokens without the stop token, as judges read it); a
character belongs to the token that completes it. Byte-level BPE tokenizers split a multi-byte
character (é, an emoji) over several tokens: the last of them owns it, the others own nothing
(an empty span). The stop token (EOS or end-of-turn), when generated, comes last with an empty
span at the end of the text and its own text ('</s>', '<|im_end|>').

Fast tokenizers give offsets; they are used when re-encoding the text gives back exactly the
sampled ids (a sampled response need not be the canonical tokenisation of its text) and each
token's decoded text matches its span. Otherwise spans come from decoding prefixes, which works
for any tokenizer (quadratic in the length, so only as the fallback).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from rto.errors import RtoError

REPLACEMENT = "\ufffd"  # what decode gives for an incomplete UTF-8 sequence


class TokenSpan(NamedTuple):
    """One response token: its text and its characters response[start:end]."""

    text: str
    start: int
    end: int


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def spans_by_decoding(tokenizer: Any, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Spans from decoding each prefix: token k ends where decode(ids[:k+1]) stops agreeing
    with the whole text (an incomplete character decodes to U+FFFD, so it is not counted until
    the token that completes it)."""
    spans, start = [], 0
    for k in range(len(ids)):
        end = (
            len(text) if k == len(ids) - 1 else _common_prefix(tokenizer.decode(ids[: k + 1]), text)
        )
        end = max(end, start)
        spans.append((start, end))
        start = end
    return spans


def spans_from_offsets(
    offsets: list[tuple[int, int]], pieces: list[str], text: str
) -> list[tuple[int, int]] | None:
    """Spans from a fast tokenizer's offsets, or None when they do not describe `text` under
    the convention (checked token by token against each token's own decoded text)."""
    spans, start = [], 0
    for k, (_, end) in enumerate(offsets):
        if k + 1 < len(offsets):  # a character split over tokens belongs to the last of them
            end = min(end, offsets[k + 1][0])
        end = max(end, start)
        spans.append((start, end))
        start = end
    if not spans or spans[-1][1] != len(text):
        return None
    for (s, e), piece in zip(spans, pieces):
        # a token decoded alone may lose its leading space (SentencePiece's decoder strips it)
        if REPLACEMENT not in piece and text[s:e] != piece and text[s:e].lstrip() != piece.lstrip():
            return None
    return spans


def token_spans(
    tokenizer: Any,
    responses: list[list[int]],
    stop_ids: list[int],
    *,
    use_offsets: bool = True,
) -> tuple[list[str], list[list[TokenSpan]]]:
    """(texts, spans): each response's text (as `decode_responses` gives it) and one TokenSpan
    per token of `responses` (each list: the real tokens, up to and including a stop token)."""
    stop = set(stop_ids)
    kept = [[t for t in ids if t not in stop] for ids in responses]
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in kept]
    offsets: list[Any] = [None] * len(kept)
    if use_offsets and getattr(tokenizer, "is_fast", False) and texts:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [
            o if list(e) == ids else None
            for ids, e, o in zip(kept, enc["input_ids"], enc["offset_mapping"])
        ]
    out = []
    for ids, kept_ids, text, offs in zip(responses, kept, texts, offsets):
        pieces = [tokenizer.decode([t], skip_special_tokens=False) for t in kept_ids]
        spans = spans_from_offsets([tuple(o) for o in offs], pieces, text) if offs else None
        if spans is None:
            spans = spans_by_decoding(tokenizer, kept_ids, text)
        row = [TokenSpan(text[s:e], s, e) for s, e in spans]
        for t in ids[len(kept_ids) :]:  # the stop token, last
            row.append(
                TokenSpan(tokenizer.decode([t], skip_special_tokens=False), len(text), len(text))
            )
        out.append(row)
    return texts, out


def token_at_char(spans: list[TokenSpan], char: int) -> int | None:
    """Index of the token that owns character `char`."""
    for k, s in enumerate(spans):
        if s.start <= char < s.end:
            return k
    return None


def rewards_on_tokens(value: Any, spans: list[TokenSpan], text: str, where: str) -> list[float]:
    """One response's rewards per token, from what a token reward function returned for it:
    a list of numbers, one per token (len(spans)), or a list of (start, end, reward) character
    spans of the text, each reward placed on the token that owns the span's last character
    (rewards of spans ending on the same token add up; an empty list rewards nothing)."""
    if not isinstance(value, (list, tuple)):
        raise RtoError(
            f"{where}: expected a list (one reward per token, or (start, end, reward) spans), got {value!r:.80}"
        )
    items = list(value)
    if items and all(_is_number(v) for v in items):  # an empty list: no span rewarded
        if len(items) != len(spans):
            raise RtoError(f"{where}: {len(items)} rewards for {len(spans)} tokens; give one per token "
                           "(the stop token included), or (start, end, reward) character spans")  # fmt: skip
        rewards = [float(v) for v in items]
    else:
        rewards = [0.0] * len(spans)
        for item in items:
            if not (
                isinstance(item, (list, tuple))
                and len(item) == 3
                and all(_is_number(v) for v in item)
            ):
                raise RtoError(
                    f"{where}: {item!r:.80} is neither a number nor a (start, end, reward) span"
                )
            start, end, reward = item
            if start != int(start) or end != int(end) or not 0 <= start < end <= len(text):
                raise RtoError(f"{where}: span ({start}, {end}) is not a non-empty character range of the "
                               f"response (length {len(text)})")  # fmt: skip
            k = token_at_char(spans, int(end) - 1)
            assert k is not None  # spans cover the text
            rewards[k] += float(reward)
    bad = [i for i, v in enumerate(rewards) if not math.isfinite(v)]
    if bad:
        raise RtoError(f"{where}: the reward of token {bad[0]} is not finite ({rewards[bad[0]]})")
    return rewards


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def delimiter_token_ids(tokenizer: Any, delimiters: list[str]) -> list[int]:
    """Ids of tokens whose text ends with a segment delimiter ('.', '!', '?', newline), spaces
    and tabs after it aside. Newline tokens ("\n", " \n", "\n\n") are delimiters themselves."""
    ids = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id]).rstrip(" \t")
        if text and text.endswith(tuple(delimiters)):
            ids.append(token_id)
    return ids
