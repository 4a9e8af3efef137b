"""Chat templates as real models have them: a reply ends at the template's end-of-turn token in
every stage (training targets, reward-model score position, DPO log-probs, the RL stop), whatever
the template puts after it; judges and exports read the user's instruction, not the rendered
template; plain prompts meet the chat template by default when the tokenizer has one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rto.config.sections import ModelSection
from rto.data.formats import end_of_turn
from rto.data.sources import load_rows
from rto.data.tokenize import IGNORE, build_pairs, build_prompts, build_sft
from rto.models.forward import last_real_index
from rto.models.generate import response_mask_from_ids, stop_ids
from rto.models.load import load_tokenizer

TEMPLATED = ["chat_task", "qwen2_task", "llama3_task"]
TURN_END = {"chat_task": "</s>", "qwen2_task": "<|im_end|>", "llama3_task": "<|eot_id|>"}
CHAT = [
    {"role": "system", "content": "You write restaurant reviews."},
    {"role": "user", "content": "the food was"},
    {"role": "assistant", "content": "very good ."},
]


def tokenizer(request: pytest.FixtureRequest, task: str):
    return load_tokenizer(ModelSection(path=str(request.getfixturevalue(task) / "base_model")))


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("task", TEMPLATED)
def test_end_of_turn_token_is_found_and_stops_generation(
    request: pytest.FixtureRequest, task: str
) -> None:
    tok = tokenizer(request, task)
    text, token_id = end_of_turn(tok)
    assert text == TURN_END[task]
    assert token_id in stop_ids(tok)
    if task == "llama3_task":  # the EOS alone would never stop a Llama-3 chat reply
        assert tok.eos_token_id != token_id


def test_a_base_model_has_no_end_of_turn(tiny_task: Path) -> None:
    tok = load_tokenizer(ModelSection(path=str(tiny_task / "base_model")))
    assert end_of_turn(tok) is None and stop_ids(tok) == [tok.eos_token_id]


@pytest.mark.parametrize("task", TEMPLATED)
def test_sft_targets_end_at_the_end_of_turn(
    request: pytest.FixtureRequest, task: str, tmp_path: Path
) -> None:
    tok = tokenizer(request, task)
    rows = load_rows(jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}]))
    (ex,), _ = build_sft(
        rows, tok, max_length=96, max_prompt_length=64, completion_only=True, source=task
    )
    targets = [t for t in ex["labels"] if t != IGNORE]
    assert tok.decode(targets) == "very good ." + TURN_END[task]
    # nothing after the end of turn is trained on, nor fed to the model (ChatML's newline)
    assert ex["input_ids"][-1] == end_of_turn(tok)[1]


@pytest.mark.parametrize("task", TEMPLATED)
def test_reward_model_is_read_in_rl_where_it_was_trained(
    request: pytest.FixtureRequest, task: str, tmp_path: Path
) -> None:
    """The token sequence the reward model is trained on (prompt + chosen) is exactly the one RL
    scores when the policy writes the same reply and carries on past the end of turn as a chat
    model does: same tokens, so the score is read at the same token (the end of turn)."""
    tok = tokenizer(request, task)
    prompt = CHAT[:2]
    pair = {"prompt": prompt, "chosen": "very good .", "rejected": "bad ."}
    (ex,), _ = build_pairs(
        load_rows(jsonl(tmp_path / "p.jsonl", [pair])), tok, max_length=96,
        max_prompt_length=64, source=task,
    )  # fmt: skip
    trained = ex["prompt_ids"] + ex["chosen_ids"]
    assert trained[-1] == end_of_turn(tok)[1]

    (p,), _ = build_prompts(
        load_rows(jsonl(tmp_path / "q.jsonl", [{"prompt": prompt}])), tok,
        max_prompt_length=64, source=task,
    )  # fmt: skip
    assert p["prompt_ids"] == ex["prompt_ids"]
    # what a chat model generates: the reply, its end of turn, then whatever follows in the template
    rendered = tok.apply_chat_template(CHAT + [{"role": "user", "content": "more"}], tokenize=False)
    continuation = rendered[rendered.index("very good .") :]
    generated = torch.tensor([tok(continuation, add_special_tokens=False).input_ids])
    mask, truncated = response_mask_from_ids(generated, stop_ids(tok))
    assert not truncated.item()
    response = generated[0][mask[0].bool()].tolist()
    assert p["prompt_ids"] + response == trained
    full_mask = torch.ones(1, len(trained), dtype=torch.long)
    assert trained[int(last_real_index(full_mask))] == end_of_turn(tok)[1]


def test_judges_and_exports_read_the_users_instruction(qwen2_task: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(ModelSection(path=str(qwen2_task / "base_model")))
    rows = [{"prompt": CHAT[:2]}, {"messages": CHAT}, {"prompt": "the staff was"}]
    examples, report = build_prompts(
        load_rows(jsonl(tmp_path / "p.jsonl", rows)), tok, max_prompt_length=64, source="q"
    )
    assert [e["prompt"] for e in examples] == ["the food was", "the food was", "the staff was"]
    assert examples[0]["rendered"].startswith("<|im_start|>system\nYou write")
    assert examples[0]["prompt_value"] == CHAT[:2]
    assert "chat template" in report.describe()


def test_ultrafeedback_prompt_rows_meet_the_chat_template(qwen2_task: Path, tmp_path: Path) -> None:
    """A plain `prompt` string beside `messages` (UltraFeedback style) is rendered with the chat
    template by default when the tokenizer has one, as the messages would be; `false` keeps it
    plain and the report says which was done."""
    tok = load_tokenizer(ModelSection(path=str(qwen2_task / "base_model")))
    row = {"prompt": "the food was", "messages": CHAT[1:]}
    path = jsonl(tmp_path / "uf.jsonl", [row])
    (auto,), report = build_prompts(load_rows(path), tok, max_prompt_length=64, source="q")
    (msgs,), _ = build_prompts(
        load_rows(jsonl(tmp_path / "m.jsonl", [{"messages": CHAT[1:]}])), tok,
        max_prompt_length=64, source="q",
    )  # fmt: skip
    assert auto["prompt_ids"] == msgs["prompt_ids"]
    assert "rendered with the tokenizer's chat template" in report.describe()
    (plain,), report = build_prompts(
        load_rows(path), tok, max_prompt_length=64, source="q", chat_prompts="false"
    )
    assert plain["rendered"] == "the food was" and "plain-text" in report.describe()


def test_pairs_from_chat_prompts_reproduce_the_prompt_in_rm_and_dpo(
    qwen2_task: Path, tmp_path: Path
) -> None:
    """`rto pairs` writes the prompt as the row held it (messages) and replies as text; reading
    that file back renders the same prompt tokens and closes each reply with the end of turn."""
    tok = load_tokenizer(ModelSection(path=str(qwen2_task / "base_model")))
    (p,), _ = build_prompts(
        load_rows(jsonl(tmp_path / "q.jsonl", [{"prompt": CHAT[:2]}])), tok,
        max_prompt_length=64, source="q",
    )  # fmt: skip
    pair = {"prompt": p["prompt_value"], "chosen": "good .", "rejected": "bad ."}
    (ex,), _ = build_pairs(
        load_rows(jsonl(tmp_path / "pairs.jsonl", [pair])), tok, max_length=96,
        max_prompt_length=64, source="q",
    )  # fmt: skip
    assert ex["prompt_ids"] == p["prompt_ids"]
    assert tok.decode(ex["chosen_ids"]) == "good .<|im_end|>"
