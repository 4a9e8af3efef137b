"""The built-in sentiment task: deterministic files, a balanced corpus, a gold reward that
depends on context, and a fluency check that catches reward hacking."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rto.tasks import sentiment
from rto.tasks.sentiment import grammar
from rto.tasks.sentiment.grammar import generate_text, is_well_formed

from conftest import TINY_TASK, rto_ok


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        # the run's records name its output folder (the card, README.md, is written from them)
        if p.is_file() and p.name not in ("summary.json", "config.yaml", "README.md")
    }


def test_same_seed_gives_byte_identical_files(tiny_task: Path, tmp_path: Path) -> None:
    rto_ok("task", "sentiment", "--out", tmp_path / "again", *TINY_TASK)
    a, b = _files(tiny_task), _files(tmp_path / "again")
    assert a.keys() == b.keys() and "base_model/model.safetensors" in a
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    rto_ok("task", "sentiment", "--out", tmp_path / "other", "--seed", "1", *TINY_TASK)
    assert _files(tmp_path / "other")["sft_train.jsonl"] != a["sft_train.jsonl"]


def test_corpus_is_balanced_and_well_formed(tiny_task: Path) -> None:
    rows = [json.loads(line) for line in (tiny_task / "sft_train.jsonl").read_text().splitlines()]
    gold = sentiment.gold_reward([], [r["completion"] for r in rows])
    assert abs(statistics.fmean(gold)) < 0.05
    assert 0.4 < sum(g > 0 for g in gold) / len(gold) < 0.6
    assert all(sentiment.fluency([r["prompt"]], [r["completion"]])[0] for r in rows)
    info = json.loads((tiny_task / "task.json").read_text())
    assert (
        info["gold_reward"] == "sentiment"
        and (tiny_task / info["files"]["base_model"] / "config.json").exists()
    )


def test_gold_reward_depends_on_context() -> None:
    good, not_good, very_good, but = sentiment.gold_reward(
        [],
        [" good .", " not good .", " very good .", " the food was good but the staff was rude ."],
    )
    assert not_good < 0 < good < very_good  # negation flips, intensifiers boost
    assert but < 0  # after "but" counts more


def test_fluency_catches_reward_hacking() -> None:
    fluent = sentiment.fluency(
        ["the food was"] * 5,
        [" great .", " great great great .", " great . the food was great .", " great", "great ."],
    )
    # ok; repeated word; repeated sentence; no ending; missing space (not the grammar's text)
    assert fluent == [True, False, False, False, False]


def test_generator_only_makes_parsable_texts() -> None:
    import random

    rng = random.Random(3)
    texts = [" ".join(generate_text(rng)) for _ in range(500)]
    assert sum(is_well_formed(t) for t in texts) >= 495  # only rare repeated sentences fail


def test_user_judges_by_module_function(tmp_path: Path, monkeypatch) -> None:
    import pytest

    from rto.errors import ConfigError, RtoError
    from rto.tasks import call_judge, resolve

    (tmp_path / "my_judges.py").write_text(
        "def length(prompts, responses):\n    return [len(r) for r in responses]\n"
        "def broken(prompts, responses):\n    return [float('nan')] * len(responses)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = resolve("my_judges:length", "gold", "gold_reward")
    assert call_judge(fn, ["p", "p"], ["ab", "abc"], "my_judges:length", "gold") == [2.0, 3.0]
    with pytest.raises(RtoError, match="returned a non-finite value, nan, for response 0"):
        call_judge(
            resolve("my_judges:broken", "gold", "k"), ["p"], ["x"], "my_judges:broken", "gold"
        )
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        resolve("my_judges:nope", "gold", "gold_reward")
    with pytest.raises(ConfigError, match="not a registered gold judge"):
        resolve("vader", "gold", "gold_reward")


def test_base_model_comes_in_the_shapes_real_models_have(
    gpt2_task: Path, qwen2_task: Path, llama3_task: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good ."}]
    gpt2 = AutoModelForCausalLM.from_pretrained(gpt2_task / "base_model")
    assert gpt2.config.model_type == "gpt2" and gpt2.config.attn_pdrop == 0.1
    assert AutoTokenizer.from_pretrained(gpt2_task / "base_model").chat_template is None
    qwen = AutoModelForCausalLM.from_pretrained(qwen2_task / "base_model")
    tok = AutoTokenizer.from_pretrained(qwen2_task / "base_model")
    assert qwen.config.model_type == "qwen2" and qwen.config.attention_dropout == 0.1
    assert tok.apply_chat_template(reply, tokenize=False).endswith("good .<|im_end|>\n")
    assert tok.eos_token == "<|im_end|>"
    tok = AutoTokenizer.from_pretrained(llama3_task / "base_model")
    assert tok.apply_chat_template(reply, tokenize=False).endswith("good .<|eot_id|>")
    assert tok.eos_token == "<|end_of_text|>" and tok("a").input_ids[0] == tok.bos_token_id


# --------------------------------------------------------------------------- longer reviews

LONG_TASK = ["--num_sft", "300", "--num_sft_eval", "20", "--num_train_prompts", "40",
             "--num_eval_prompts", "20", "--hidden_size", "32",
             "--num_layers", "1", "--num_heads", "2"]  # fmt: skip


def test_default_task_data_is_the_data_every_published_number_used(tiny_task: Path) -> None:
    """The longer-review option must leave the built-in task's data as it was: these hashes are
    of the files the benchmarks and the README's tables were made from (Python's random and
    VADER only; the model weights are checked for determinism above)."""
    import hashlib

    digest = {
        name: hashlib.sha256((tiny_task / name).read_bytes()).hexdigest()[:16]
        for name in ("sft_train.jsonl", "prompts_train.jsonl", "prompts_eval.jsonl")
    }
    assert digest == PINNED_TINY_TASK, digest
    assert "review_length" not in json.loads((tiny_task / "task.json").read_text())


PINNED_TINY_TASK = {"sft_train.jsonl": "1268358984d588ff", "prompts_train.jsonl": "6ef89ffaacd2c972",
                    "prompts_eval.jsonl": "6c290019f12cf1c3"}  # fmt: skip


def test_longer_reviews_have_the_lengths_asked_for(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    means = {}
    for length, judge in (("medium", "sentiment_medium"), ("long", "sentiment_long")):
        out = tmp_path / length
        rto_ok("task", "sentiment", "--out", out, "--review_length", length, *LONG_TASK)
        info = json.loads((out / "task.json").read_text())
        assert info["review_length"] == length and info["fluency"] == judge
        rows = [json.loads(line) for line in (out / "sft_train.jsonl").read_text().splitlines()]
        tok = AutoTokenizer.from_pretrained(out / "base_model")
        lengths = sorted(len(tok(r["completion"]).input_ids) for r in rows)
        means[length] = statistics.fmean(lengths)
        # every row is a fluent review of its length, none of them a fluent short review
        fluent = tasks_resolve(judge)([r["prompt"] for r in rows], [r["completion"] for r in rows])
        assert all(fluent)
        gold = sentiment.gold_reward([], [r["completion"] for r in rows])
        assert (
            abs(statistics.fmean(gold)) < 0.1 and 0.45 < sum(g > 0 for g in gold) / len(gold) < 0.55
        )
        if length == "long":
            assert not any(sentiment.fluency([r["prompt"]], [r["completion"]])[0] for r in rows)
            assert lengths[len(lengths) // 20] >= 50 and lengths[-len(lengths) // 20] <= 130
            config = json.loads((out / "base_model" / "config.json").read_text())
            assert config["max_position_embeddings"] == 256
    assert 30 < means["medium"] < 45 and 80 < means["long"] < 100


def test_long_reviews_fit_every_architecture(tmp_path: Path) -> None:
    """GPT-2 learns its positions: its table must hold the long reviews too (and Qwen2's ChatML
    template adds tokens around them)."""
    from transformers import AutoConfig, AutoTokenizer

    for arch, template in (("gpt2", "none"), ("qwen2", "chatml")):
        out = tmp_path / arch
        rto_ok("task", "sentiment", "--out", out, "--review_length", "long", "--arch", arch,
               "--chat_template", template, *LONG_TASK)  # fmt: skip
        config = AutoConfig.from_pretrained(out / "base_model")
        positions = getattr(config, "n_positions", None) or config.max_position_embeddings
        assert positions == 256
        tok = AutoTokenizer.from_pretrained(out / "base_model")
        rows = [json.loads(line) for line in (out / "sft_train.jsonl").read_text().splitlines()]
        assert max(len(tok(r["prompt"] + r["completion"]).input_ids) for r in rows) < 200


def tasks_resolve(name: str):
    from rto.tasks import resolve

    return resolve(name, "fluency", "eval.fluency")


def test_long_fluency_accepts_the_grammar_and_catches_hacking() -> None:
    import random

    rng = random.Random(5)
    texts = [" ".join(generate_text(rng, "long")) for _ in range(300)]
    assert sum(is_well_formed(t, "long") for t in texts) >= 270  # a few repeat a sentence
    assert not any(is_well_formed(t) for t in texts)  # the short judge's limit is 4 sentences
    text = next(t for t in texts if is_well_formed(t, "long"))
    sentences = sentiment.parse_sentences(text)
    prompt, response = "the food was", " " + text.split(" ", 3)[3]
    judge = tasks_resolve("sentiment_long")
    assert judge([prompt], [response]) == [is_well_formed(prompt + response, "long")]
    repeated = " ".join(sentences[:3] + sentences[1:2])  # the same sentence twice
    too_long = " ".join(f"the {n} was good ." for n in grammar.NOUNS[:14])  # 14 sentences
    thirteen = " ".join(f"the {n} was good ." for n in grammar.NOUNS[:13])
    no_end = " ".join(sentences[:3])[:-2]
    word_repeat = text.replace(" .", " . the food was good good .", 1)
    assert [is_well_formed(t, "long") for t in (repeated, too_long, thirteen, no_end, word_repeat)
            ] == [False, False, True, False, False]  # fmt: skip
    # the gold reward is VADER at every length: the same function of the response text
    assert sentiment.gold_reward([], [response]) == sentiment.gold_reward(["x"], [response])


def test_base_model_too_short_for_long_reviews_is_refused(tmp_path: Path) -> None:
    from conftest import rto

    out = tmp_path / "long"
    code = rto("task", "sentiment", "--out", out, "--review_length", "long",
               "--max_positions", "64", *LONG_TASK)  # fmt: skip
    assert code == 2
    assert (
        not (out / "sft_train.jsonl").exists() and not (out / "base_model" / "config.json").exists()
    )
