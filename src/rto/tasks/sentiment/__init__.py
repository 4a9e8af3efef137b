"""The built-in `sentiment` task: a complete RLHF problem that runs offline on a laptop CPU.

* Texts: short reviews from a small grammar (grammar.py); `review_length` medium or long makes
  the same reviews with more sentences (responses of about 37 or 90 tokens instead of 14).
* Gold reward: VADER's compound score of the response, in [-1, 1] (the same at every length).
* Fluency: whether prompt + response is a well-formed text of the grammar (judges `sentiment`,
  `sentiment_medium`, `sentiment_long`: they differ only in the most sentences they accept).
* Data: SFT rows {prompt, completion}, train / held-out prompt rows {prompt}.
* Model: a BPE tokenizer trained here and a tiny causal LM (random init; Llama-style by default,
  GPT-2 or Qwen2 on request, with or without a chat template; model.py), both saved in Hugging
  Face format, so every later stage loads them like a user's hub model.

The same seed gives byte-identical files.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import Any

from rto.files import write_json, write_jsonl
from rto.tasks.sentiment.grammar import (
    REVIEW_LENGTHS,
    generate_text,
    is_well_formed,
    parse_sentences,
    prompt_cuts,
)


@lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound score of each response, in [-1, 1]."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(r.strip())["compound"]) for r in responses]


def fluency(prompts: list[str], responses: list[str]) -> list[bool]:
    """Whether prompt + response is a well-formed review of the grammar."""
    return [is_well_formed(p + r) for p, r in zip(prompts, responses)]


def fluency_medium(prompts: list[str], responses: list[str]) -> list[bool]:
    """`fluency` for the medium reviews (up to 7 sentences)."""
    return [is_well_formed(p + r, "medium") for p, r in zip(prompts, responses)]


def fluency_long(prompts: list[str], responses: list[str]) -> list[bool]:
    """`fluency` for the long reviews (up to 13 sentences)."""
    return [is_well_formed(p + r, "long") for p, r in zip(prompts, responses)]


# the fluency judge of each review length, by its registered name
FLUENCY = {"short": "sentiment", "medium": "sentiment_medium", "long": "sentiment_long"}


def word_valence(word: str) -> float:
    """VADER's lexicon valence of a single word (0 for words outside the lexicon)."""
    return float(_vader().lexicon.get(word.lower(), 0.0))


# --------------------------------------------------------------------------- corpus


def _texts(rng: random.Random, n: int, length: str = "short") -> list[list[str]]:
    out = []
    while len(out) < n:
        words = generate_text(rng, length)
        if is_well_formed(" ".join(words), length):
            out.append(words)
    return out


def _split(rng: random.Random, words: list[str]) -> tuple[str, str]:
    cut = rng.choice(prompt_cuts(words))
    return " ".join(words[:cut]), " " + " ".join(words[cut:])


def _balanced_rows(rng: random.Random, n: int, length: str = "short") -> list[dict[str, str]]:
    """n {prompt, completion} rows with as many positive as negative completions (gold reward
    sign), so the corpus mean gold reward is near zero. A tenth of the short ones score exactly 0;
    longer completions almost never do, so theirs are only positive and negative."""
    pos: list[dict[str, str]] = []
    neg: list[dict[str, str]] = []
    neutral: list[dict[str, str]] = []
    n_neutral = n // 10 if length == "short" else 0
    half = (n - n_neutral) // 2
    while len(pos) < half or len(neg) < n - n_neutral - half or len(neutral) < n_neutral:
        for words in _texts(rng, 256, length):
            prompt, completion = _split(rng, words)
            score = gold_reward([prompt], [completion])[0]
            bucket = pos if score > 0 else neg if score < 0 else neutral
            bucket.append({"prompt": prompt, "completion": completion})
    rows = pos[:half] + neg[: n - n_neutral - half] + neutral[:n_neutral]
    rng.shuffle(rows)
    return rows


def build(cfg: Any) -> dict[str, Any]:
    """Write the task's data and base model into cfg.out; return a description of what was made."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    length = getattr(cfg, "review_length", "short")
    rng = random.Random(cfg.seed)
    sft_train = _balanced_rows(rng, cfg.num_sft, length)
    sft_eval = _balanced_rows(rng, cfg.num_sft_eval, length)
    seen = {r["prompt"] + r["completion"] for r in sft_train}
    sft_eval = [r for r in sft_eval if r["prompt"] + r["completion"] not in seen] or sft_eval
    prompts_train = [
        {"prompt": _split(rng, w)[0]} for w in _texts(rng, cfg.num_train_prompts, length)
    ]
    prompts_eval = [
        {"prompt": _split(rng, w)[0]} for w in _texts(rng, cfg.num_eval_prompts, length)
    ]

    from rto.tasks.sentiment.model import build_base_model

    corpus = [r["prompt"] + r["completion"] for r in sft_train]
    # the model is built first: it refuses a max_positions too short for the corpus before any
    # file is written
    model_info = build_base_model(corpus, out / "base_model", cfg)
    write_jsonl(out / "sft_train.jsonl", sft_train)
    write_jsonl(out / "sft_eval.jsonl", sft_eval)
    write_jsonl(out / "prompts_train.jsonl", prompts_train)
    write_jsonl(out / "prompts_eval.jsonl", prompts_eval)
    gold = gold_reward([], [r["completion"] for r in sft_train])
    info = {
        "task": "sentiment",
        "seed": cfg.seed,
        # absent for the built-in short reviews, so that the default task's files stay as they were
        **({"review_length": length} if length != "short" else {}),
        "gold_reward": "sentiment",
        "fluency": FLUENCY[length],
        "files": {
            "sft_train": "sft_train.jsonl",
            "sft_eval": "sft_eval.jsonl",
            "prompts_train": "prompts_train.jsonl",
            "prompts_eval": "prompts_eval.jsonl",
            "base_model": "base_model",
        },
        "sizes": {
            "sft_train": len(sft_train),
            "sft_eval": len(sft_eval),
            "prompts_train": len(prompts_train),
            "prompts_eval": len(prompts_eval),
        },
        "corpus_gold_reward_mean": round(sum(gold) / len(gold), 4),
        "corpus_positive_share": round(sum(g > 0 for g in gold) / len(gold), 4),
        "model": model_info,
    }
    write_json(out / "task.json", info)
    return info


__all__ = [
    "REVIEW_LENGTHS",
    "build",
    "fluency",
    "fluency_long",
    "fluency_medium",
    "gold_reward",
    "parse_sentences",
    "word_valence",
]
