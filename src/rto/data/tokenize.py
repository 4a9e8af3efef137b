"""Rows -> token ids, with truncation that keeps the end of the prompt and the start of the
response, counted drops, and the collators that pad batches.

Every builder returns plain lists of ints (cheap to shuffle, index and checkpoint) and a
`DataReport` saying how many rows were kept, dropped (and why) and truncated.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from rto.data import formats
from rto.data.sources import Rows, load_rows, subsample
from rto.errors import DataError

IGNORE = -100


@dataclass
class DataReport:
    source: str
    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    rendering: str = ""  # how prompts were rendered (chat template or plain text)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.total,
            "kept": self.kept,
            "truncated": self.truncated,
            "dropped": dict(self.dropped),
            **({"rendering": self.rendering} if self.rendering else {}),
        }

    def describe(self) -> str:
        text = f"{self.source}: kept {self.kept} of {self.total} rows"
        if self.truncated:
            text += f", truncated {self.truncated}"
        if self.dropped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.dropped.items()))
            text += f"; dropped {sum(self.dropped.values())} ({reasons})"
        if self.rendering:
            text += f"; {self.rendering}"
        return text


def special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts in front of plain text on its own (a BOS token, usually)."""
    probe = "a"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    without = tokenizer(probe, add_special_tokens=False)["input_ids"]
    n = len(without)
    for start in range(len(with_special) - n + 1):
        if with_special[start : start + n] == without:
            return list(with_special[:start])
    return []


def _encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    unique = list(dict.fromkeys(texts))
    ids = tokenizer(unique, add_special_tokens=False)["input_ids"]
    table = dict(zip(unique, ids))
    return [list(table[t]) for t in texts]


def eos_ids(tokenizer: Any) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')} has no EOS token; set one (tokenizer.eos_token) "
            "so responses can end"
        )
    return [tokenizer.eos_token_id]


def truncate(
    prompt: list[int], response: list[int], max_prompt: int, max_len: int
) -> tuple[list[int], list[int], bool]:
    """Keep the end of the prompt and the start of the response."""
    cut = False
    if len(prompt) > max_prompt:
        prompt, cut = prompt[len(prompt) - max_prompt :], True
    room = max_len - len(prompt)
    if len(response) > room:
        response, cut = response[:room], True
    return prompt, response, cut


# --------------------------------------------------------------------------- SFT


def build_sft(
    rows: Rows,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int,
    completion_only: bool,
    source: str,
    chat_prompts: bool | str = "auto",
) -> tuple[list[dict[str, list[int]]], DataReport]:
    """Examples {input_ids, labels}; labels are IGNORE on prompt tokens when completion_only."""
    fmt = formats.sft_format(rows.columns)
    if not fmt:
        raise DataError(
            f"{rows.origin}: no SFT columns found (it has {', '.join(rows.columns) or 'no columns'}); "
            f"SFT rows need {formats.SFT_FORMATS}"
        )
    render = formats.ChatRenderer(tokenizer, source, chat_prompts)
    report = DataReport(rows.origin, total=len(rows), rendering=render.describe())
    rendered = [formats.sft_pieces(row, fmt, render, rows.where(i)) for i, row in enumerate(rows)]
    flat = [p.text for pieces, _ in rendered for p in pieces]
    encoded = iter(_encode_many(tokenizer, flat))
    plain_prefix, plain_eos = special_prefix(tokenizer), eos_ids(tokenizer)
    examples = []
    for pieces, from_chat in rendered:
        prefix, eos = ([], []) if from_chat else (plain_prefix, plain_eos)
        if from_chat and not render.closes_turn:  # a template that closes replies with nothing
            eos = plain_eos
        ids_list = [next(encoded) for _ in pieces]
        if not any(p.trainable and ids for p, ids in zip(pieces, ids_list)):
            report.drop("empty response")
            continue
        # prompt = the leading pieces that are not trained on; response = the rest (+ EOS)
        n_prompt = 0
        while n_prompt < len(pieces) and not pieces[n_prompt].trainable:
            n_prompt += 1
        prompt = prefix + [t for ids in ids_list[:n_prompt] for t in ids]
        response: list[int] = []
        train_mask: list[bool] = []
        for p, ids in zip(pieces[n_prompt:], ids_list[n_prompt:]):
            response += ids
            train_mask += [p.trainable] * len(ids)
        response += eos
        train_mask += [True] * len(eos)
        prompt, response, cut = truncate(prompt, response, max_prompt_length, max_length)
        train_mask = train_mask[: len(response)]
        if not any(train_mask):
            report.drop("response cut to nothing by max_length")
            continue
        report.truncated += int(cut)
        labels = [IGNORE if completion_only else t for t in prompt]
        labels += [
            t if (m or not completion_only) else IGNORE for t, m in zip(response, train_mask)
        ]
        examples.append({"input_ids": prompt + response, "labels": labels})
    report.kept = len(examples)
    return examples, report


def added_specials(
    from_chat: bool, render: formats.ChatRenderer, prefix: list[int], eos: list[int]
) -> tuple[list[int], list[int]]:
    """(ids before the prompt, ids after a response) that rto adds to a prompt + response:
    plain text gets the tokenizer's BOS prefix and the EOS; text rendered by a chat template
    brings its own, except that a template closing replies with no special token gets the EOS."""
    if not from_chat:
        return prefix, eos
    return [], ([] if render.closes_turn else eos)


# --------------------------------------------------------------------------- preference pairs


def build_pairs(
    rows: Rows,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int,
    source: str,
    keep: tuple[str, ...] = (),
    chat_prompts: bool | str = "auto",
) -> tuple[list[dict[str, Any]], DataReport]:
    """Examples {prompt_ids, chosen_ids, rejected_ids} (+ the `keep` columns, e.g. gold scores)."""
    cols = rows.columns
    for col in ("chosen", "rejected"):
        if col not in cols:
            raise DataError(
                f"{rows.origin}: missing column '{col}' (it has {', '.join(cols) or 'no columns'}); "
                f"preference rows need {formats.PREFERENCE_FORMATS}"
            )
    render = formats.ChatRenderer(tokenizer, source, chat_prompts)
    report = DataReport(rows.origin, total=len(rows), rendering=render.describe())
    texts = [formats.preference_text(row, render, rows.where(i)) for i, row in enumerate(rows)]
    enc = iter(
        _encode_many(tokenizer, [s for t in texts for s in (t.prompt, t.chosen, t.rejected)])
    )
    prefix = special_prefix(tokenizer)
    eos = eos_ids(tokenizer)
    examples = []
    for i, t in enumerate(texts):
        p, c, r = next(enc), next(enc), next(enc)
        if not t.prompt.strip():
            report.drop("empty prompt")
            continue
        if not t.chosen.strip() or not t.rejected.strip():
            report.drop("empty chosen or rejected response")
            continue
        if t.chosen == t.rejected:
            report.drop("identical chosen and rejected")
            continue
        before, after = added_specials(t.from_chat, render, prefix, eos)
        p, c, r = before + p, c + after, r + after
        p1, c, cut_c = truncate(p, c, max_prompt_length, max_length)
        _, r, cut_r = truncate(p, r, max_prompt_length, max_length)
        if c == r:
            report.drop("chosen and rejected identical after truncation")
            continue
        report.truncated += cut_c or cut_r
        ex: dict[str, Any] = {"prompt_ids": p1, "chosen_ids": c, "rejected_ids": r}
        for k in keep:
            if k in rows[i]:
                ex[k] = rows[i][k]
        examples.append(ex)
    report.kept = len(examples)
    return examples, report


def encode_scored(
    tokenizer: Any,
    render: formats.ChatRenderer,
    prompts: list[Any],
    responses: list[str],
    *,
    max_length: int | None = None,
) -> tuple[list[list[int]], int]:
    """(ids, truncated): prompt + response ids of each (prompt, response) exactly as
    `build_pairs` encodes a row {prompt, chosen: response} (chat template, BOS, end of turn or
    EOS), so a reward model reads RL samples as it read its training pairs. `prompts` are what
    the rows held (strings or messages). Longer than `max_length` (the model's positions): the
    prompt keeps its end, then the response its start; `truncated` counts them."""
    texts = [
        formats.scored_text(p, r, render, f"response {i}")
        for i, (p, r) in enumerate(zip(prompts, responses))
    ]
    enc = iter(_encode_many(tokenizer, [s for t in texts for s in t[:2]]))
    prefix, eos = special_prefix(tokenizer), eos_ids(tokenizer)
    out, truncated = [], 0
    for _, _, from_chat in texts:
        p, r = next(enc), next(enc)
        before, after = added_specials(from_chat, render, prefix, eos)
        p, r = before + p, r + after
        if max_length is not None and len(p) + len(r) > max_length:
            p, r, _ = truncate(p, r, max(max_length - len(r), 1), max_length)
            truncated += 1
        out.append(p + r)
    return out, truncated


# --------------------------------------------------------------------------- prompts


def build_prompts(
    rows: Rows,
    tokenizer: Any,
    *,
    max_prompt_length: int,
    source: str,
    chat_prompts: bool | str = "auto",
) -> tuple[list[dict[str, Any]], DataReport]:
    """Examples {prompt_ids, prompt, rendered, prompt_value, id}: prompts longer than the limit
    keep their end (counted). `prompt` is what judges and exports read (the plain prompt, or the
    last user turn of messages), `rendered` what the policy is given, `prompt_value` the prompt
    as the row holds it. `id` is the row's question_id / uid / id column when it has one, else
    its row number."""
    if "prompt" not in rows.columns and "messages" not in rows.columns:
        raise DataError(
            f"{rows.origin}: missing column 'prompt' (it has {', '.join(rows.columns) or 'no columns'}); "
            f"prompt rows need {formats.PROMPT_FORMATS}"
        )
    render = formats.ChatRenderer(tokenizer, source, chat_prompts)
    report = DataReport(rows.origin, total=len(rows), rendering=render.describe())
    texts = [formats.prompt_text(row, render, rows.where(i)) for i, row in enumerate(rows)]
    encoded = _encode_many(tokenizer, [t.rendered for t in texts])
    prefix = special_prefix(tokenizer)
    examples = []
    for i, (text, ids) in enumerate(zip(texts, encoded)):
        if not text.raw.strip() or not text.rendered.strip():
            report.drop("empty prompt")
            continue
        ids = ids if text.from_chat else prefix + ids
        if len(ids) > max_prompt_length:
            ids = ids[len(ids) - max_prompt_length :]
            report.truncated += 1
        row = rows[i]
        uid = next((row[k] for k in ("question_id", "uid", "id") if row.get(k) is not None), i)
        examples.append({"prompt_ids": ids, "prompt": text.raw, "rendered": text.rendered,
                         "prompt_value": text.value, "id": uid})  # fmt: skip
    report.kept = len(examples)
    if not examples:
        raise DataError(f"{rows.origin}: no usable prompts ({report.describe()})")
    return examples, report


def load_prompts(
    spec: str,
    split: str,
    tokenizer: Any,
    *,
    max_rows: int | None,
    max_prompt_length: int,
    seed: int,
    source: str,
    chat_prompts: bool | str = "auto",
) -> tuple[list[dict[str, Any]], DataReport]:
    """Prompt examples from a dataset spec (at most `max_rows`, a seeded subset)."""
    rows = subsample(load_rows(spec, split), max_rows, seed)
    return build_prompts(
        rows,
        tokenizer,
        max_prompt_length=max_prompt_length,
        source=source,
        chat_prompts=chat_prompts,
    )


# --------------------------------------------------------------------------- collators


def pad(
    seqs: list[list[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (B, L) padded on `side` to the longest sequence."""
    width = max(len(s) for s in seqs) if seqs else 0
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        else:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids, mask


def collate_sft(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = pad([e["input_ids"] for e in examples], pad_id)
    labels, _ = pad([e["labels"] for e in examples], IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_sequences(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response sequences with `response_mask` on the response tokens."""
    ids, mask = pad([p + r for p, r in zip(prompts, responses)], pad_id)
    resp_mask = torch.zeros_like(mask)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        resp_mask[i, len(p) : len(p) + len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "response_mask": resp_mask}


def collate_pairs(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows: one forward pass scores both halves."""
    prompts = [e["prompt_ids"] for e in examples] * 2
    responses = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    batch = collate_sequences(prompts, responses, pad_id)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in examples[0]:
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
    return batch
