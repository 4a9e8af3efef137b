"""The built-in sentiment task: deterministic files, a balanced corpus, a gold reward that
depends on context, and a fluency check that catches reward hacking."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rto.tasks import sentiment
from rto.tasks.sentiment.grammar import generate_text, is_well_formed

from conftest import TINY_TASK, rto_ok


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
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
