"""A user's token reward function reads text; its rewards must land on the policy tokens that
hold that text. Checked on byte-level BPE tokenizers (GPT-2, Qwen2 with ChatML) and the
built-in task's, with multi-byte characters split over tokens and with sampled token sequences
that are not the canonical tokenisation of their text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rto.config.sections import ModelSection
from rto.data.spans import rewards_on_tokens, token_spans
from rto.errors import RtoError
from rto.models.generate import stop_ids
from rto.models.load import load_tokenizer
from rto.rl.experience import Rollout
from rto.rl.rewards import SourceSettings
from rto.rl.sources import FunctionSource, SourceContext

TASKS = ["tiny_task", "gpt2_task", "qwen2_task"]
TEXTS = [
    "the food was good . the staff was not great !",
    "café naïve 😀 good\n and  bad …",
    "good",
]
WORDS = {"good": 1.0, "great": 2.0, "bad": -1.0}


def tokenizer_of(request: pytest.FixtureRequest, task: str):
    return load_tokenizer(ModelSection(path=str(request.getfixturevalue(task) / "base_model")))


def canonical(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def char_by_char(tok, text: str) -> list[int]:
    """A tokenisation of `text` a policy may sample but the tokenizer would not produce."""
    return [i for ch in text for i in tok(ch, add_special_tokens=False).input_ids]


def owner_by_prefix_decoding(tok, ids: list[int], char: int) -> int:
    """Slow reference: the first token after which the decoded prefix holds character `char`
    exactly as the whole text does."""
    full = tok.decode(ids)
    for k in range(len(ids)):
        prefix = tok.decode(ids[: k + 1])
        if len(prefix) > char and prefix[: char + 1] == full[: char + 1]:
            return k
    raise AssertionError("character never decoded")


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("how", [canonical, char_by_char])
def test_spans_cover_the_text_and_each_character_has_one_owner(
    request: pytest.FixtureRequest, task: str, how
) -> None:
    tok = tokenizer_of(request, task)
    eos = tok.eos_token_id
    for text in TEXTS:
        ids = how(tok, text)
        texts, spans = token_spans(tok, [ids + [eos]], [eos])
        slow_texts, slow_spans = token_spans(tok, [ids + [eos]], [eos], use_offsets=False)
        assert texts == slow_texts == [text]
        assert spans == slow_spans  # offsets and the decoding fallback agree
        row = spans[0]
        assert len(row) == len(ids) + 1 and row[-1].start == row[-1].end == len(text)
        assert row[-1].text == tok.eos_token
        assert "".join(s.text for s in row[:-1]) == text
        for k, s in enumerate(row[:-1]):
            assert s.text == text[s.start : s.end] and s.start == (row[k - 1].end if k else 0)
        for char in range(len(text)):  # the token that completes a character owns it
            owner = next(k for k, s in enumerate(row) if s.start <= char < s.end)
            assert owner == owner_by_prefix_decoding(tok, ids, char), (text, char)


def test_a_multi_byte_character_belongs_to_the_token_that_completes_it(
    request: pytest.FixtureRequest,
) -> None:
    tok = tokenizer_of(request, "qwen2_task")
    text = "a 😀"
    ids = canonical(tok, text)
    _, (row,) = token_spans(tok, [ids], [])
    emoji_tokens = [s for s in row if s.text == "😀"]
    assert len(emoji_tokens) == 1 and row[-1].text == "😀"
    assert len(ids) > 3 and all(s.start == s.end for s in row[-4:-1])  # 4 bytes, 4 tokens


def word_rewards_as_spans(prompts, responses, tokens):
    """A user's function: a reward on each chosen word, given as a character span."""
    return [
        [(m.start(), m.end(), WORDS[m.group()]) for m in re.finditer(r"\b(good|great|bad)\b", r)]
        for r in responses
    ]


def word_rewards_per_token(prompts, responses, tokens):
    """The same, one number per token: the reward on the token that ends the word."""
    out = []
    for r, row in zip(responses, tokens):
        ends = {m.end(): WORDS[m.group()] for m in re.finditer(r"\b(good|great|bad)\b", r)}
        out.append([ends.get(end, 0.0) if end > start else 0.0 for _, start, end in row])
    return out


def rollout_of(tok, texts: list[str], how) -> Rollout:
    eos = tok.eos_token_id
    rows = [how(tok, t) + [eos] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), 1
    empty = torch.zeros((len(rows), 1), dtype=torch.long)
    r = Rollout(empty, empty, ids, mask, torch.zeros(len(rows), dtype=torch.bool))
    r.texts["prompts"] = ["p"] * len(rows)
    return r


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("fn", [word_rewards_as_spans, word_rewards_per_token])
def test_a_token_function_rewards_exactly_the_chosen_words_tokens(
    request: pytest.FixtureRequest, task: str, fn
) -> None:
    tok = tokenizer_of(request, task)
    ctx = SourceContext(None, tok, stop_ids(tok), batch_size=4, temperature=1.0)
    source = FunctionSource(fn, "tests:fn", SourceSettings(), ctx)
    for how in (canonical, char_by_char):
        r = rollout_of(tok, TEXTS, how)
        got = source(r)
        assert got.shape == r.response_ids.shape
        for b, text in enumerate(TEXTS):
            ids = how(tok, text)
            want = torch.zeros(r.response_ids.shape[1])
            for m in re.finditer(r"\b(good|great|bad)\b", text):
                want[owner_by_prefix_decoding(tok, ids, m.end() - 1)] += WORDS[m.group()]
            assert torch.equal(got[b], want), (task, how.__name__, text)
            assert got[b].abs().sum() == sum(
                abs(WORDS[w]) for w in re.findall(r"\b(good|great|bad)\b", text)
            )


def test_bad_token_rewards_are_refused_with_the_response_named(
    request: pytest.FixtureRequest,
) -> None:
    tok = tokenizer_of(request, "tiny_task")
    ids = canonical(tok, "the food was good")
    _, (row,) = token_spans(tok, [ids], [])
    assert rewards_on_tokens([], row, "the food was good", "response 0") == [0.0] * len(row)
    with pytest.raises(RtoError, match="3 rewards for"):
        rewards_on_tokens([0.0, 1.0, 2.0], row, "the food was good", "response 0")
    with pytest.raises(RtoError, match="not a non-empty character range"):
        rewards_on_tokens([(5, 40, 1.0)], row, "the food was good", "response 0")
    with pytest.raises(RtoError, match="not finite"):
        rewards_on_tokens([(0, 3, float("nan"))], row, "the food was good", "response 0")
    with pytest.raises(RtoError, match="neither a number nor"):
        rewards_on_tokens([(0, 3)], row, "the food was good", "response 0")


def test_the_guide_per_sentence_example_rewards_each_sentences_last_token(
    request: pytest.FixtureRequest,
) -> None:
    guide = (Path(__file__).parent.parent / "docs" / "guide.md").read_text()
    code = guide.split("# my_rewards.py", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(code, namespace)  # the example as the guide shows it
    tok = tokenizer_of(request, "gpt2_task")
    text = "the food was good . the staff was not great ! and"
    ctx = SourceContext(None, tok, stop_ids(tok), batch_size=4, temperature=1.0)
    source = FunctionSource(
        namespace["sentence_checks"], "my_rewards:sentence_checks", SourceSettings(), ctx
    )
    r = rollout_of(tok, [text], canonical)
    got = source(r)[0]
    _, (row,) = token_spans(tok, [canonical(tok, text)], [])
    ends = {k: s.text for k, s in enumerate(row) if got[k] != 0}
    assert [v.strip() for v in ends.values()] == [".", "!", "and"]  # each sentence's last token
    assert [float(got[k]) for k in ends] == [1.0, -1.0, 1.0]  # the checker rejects "not"
