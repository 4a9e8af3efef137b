"""The whole pipeline on the shapes real models have, not only the built-in Llama: a GPT-2 with
its dropout (0.1) and a Qwen2 with a ChatML template (text after <|im_end|>) and dropout.

What a user would notice if rto got these wrong: dropout left on makes the KL of the policy
against itself non-zero and the PPO ratio of an unchanged policy not 1 (and DPO's implicit
rewards non-zero before any update); an end-of-turn mismatch makes RL read the reward model
where it was never trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rto.config.sections import ModelSection
from rto.models.forward import TokenScorer
from rto.models.load import load_causal_lm, load_sequence_scorer, load_tokenizer

from conftest import rto_ok

ARCHS = ["gpt2_task", "qwen2_task"]
QUIET = ["--log.progress", "false"]
LENGTHS = ["--data.max_length", "96", "--data.max_prompt_length", "48"]


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("task", ARCHS)
def test_dropout_is_off_in_every_role(request: pytest.FixtureRequest, task: str) -> None:
    """Trainable models stay in train mode (gradient checkpointing needs it) yet give the same
    numbers twice; with dropout kept (SFT's keep_dropout) they would not."""
    folder = str(request.getfixturevalue(task) / "base_model")
    section = ModelSection(path=folder)
    ids = torch.randint(5, 300, (2, 12))
    mask = torch.ones_like(ids)
    policy = load_causal_lm(section)
    assert policy.training
    with torch.no_grad():
        assert torch.equal(policy(ids).logits, policy(ids).logits)
    scorer = TokenScorer(
        load_sequence_scorer(section, folder, trainable=True, require_head=False, role="critic")
    )
    with torch.no_grad():
        assert torch.equal(scorer(ids, mask), scorer(ids, mask))
    noisy = load_causal_lm(section, keep_dropout=True)
    with torch.no_grad():
        assert not torch.equal(noisy(ids).logits, noisy(ids).logits)


@pytest.fixture(scope="module", params=ARCHS)
def pipeline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """sft -> pairs -> rm -> dpo -> rl (rto) -> eval, a few steps each, through the CLI."""
    task = request.getfixturevalue(request.param)
    root = tmp_path_factory.mktemp(request.param + "_pipeline")
    prompts, eval_prompts = task / "prompts_train.jsonl", task / "prompts_eval.jsonl"
    rto_ok("sft", "--out", root / "sft", "--model.path", task / "base_model",
           "--data.path", task / "sft_train.jsonl", "--data.eval_fraction", "0", "--data.max_rows", "1600",
           "--train.lr", "1e-2", "--train.batch_size", "32", "--train.micro_batch_size", "32",
           "--train.epochs", "2", *LENGTHS, *QUIET)  # fmt: skip
    rto_ok("pairs", "--out", root / "pairs", "--model.path", root / "sft", "--data.path", prompts,
           "--data.max_rows", "256", "--data.max_prompt_length", "48", "--gold_reward", "sentiment",
           "--generate.max_new_tokens", "40", "--generate.batch_size", "128", *QUIET)  # fmt: skip
    pref = ["--model.path", root / "sft", "--data.path", root / "pairs" / "pairs_train.jsonl",
            "--data.eval_path", root / "pairs" / "pairs_eval.jsonl", "--train.lr", "3e-3",
            "--train.batch_size", "16", "--train.micro_batch_size", "16", "--train.max_steps", "4",
            *LENGTHS, *QUIET]  # fmt: skip
    rto_ok("rm", "--out", root / "rm", *pref)
    rto_ok("dpo", "--out", root / "dpo", *pref)
    rto_ok("rl", "--out", root / "rl", "--preset", "rto", "--model.path", root / "sft",
           "--reward_model", root / "rm", "--dpo_model", root / "dpo", "--data.path", prompts,
           "--data.max_prompt_length", "48", "--rl.rollout_batch_size", "16", "--train.batch_size", "16",
           "--train.micro_batch_size", "8", "--train.lr", "1e-4", "--train.max_steps", "2",
           "--generate.max_new_tokens", "32", *QUIET)  # fmt: skip
    rto_ok("eval", "--out", root / "eval", "--policies", f"sft={root / 'sft'},rto={root / 'rl'}",
           "--ref_model", root / "sft", "--reward_model", root / "rm", "--eval.prompts", eval_prompts,
           "--eval.num_prompts", "16", "--eval.gold_reward", "sentiment", "--data.max_prompt_length", "48",
           "--generate.max_new_tokens", "32", "--export", "alpaca_eval", *QUIET)  # fmt: skip
    return {"task": task, "root": root, "arch": request.param}


def test_first_rl_iteration_sees_the_policy_equal_to_the_reference(pipeline: dict) -> None:
    """Policy = reference = the SFT model: the first rollout's KL is exactly 0, and the first
    update (before any step) has ratio 1: approx KL and clip fraction exactly 0."""
    first = next(r for r in rows(pipeline["root"] / "rl" / "metrics.jsonl") if "rollout/kl" in r)
    assert first["rollout/kl"] == 0.0
    assert first["policy/approx_kl"] == 0.0 and first["policy/clipfrac"] == 0.0


def test_dpo_implicit_rewards_start_at_zero(pipeline: dict) -> None:
    """DPO's policy starts as its reference: before the first update both implicit rewards are
    exactly 0, which dropout in the chosen / rejected passes would break."""
    first = rows(pipeline["root"] / "dpo" / "metrics.jsonl")[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0


def test_outputs_load_with_transformers_and_exports_hold_the_instruction(pipeline: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root = pipeline["root"]
    for stage in ("sft", "dpo", "rl"):
        AutoModelForCausalLM.from_pretrained(root / stage)
    AutoModelForSequenceClassification.from_pretrained(root / "rm")
    result = json.loads((root / "eval" / "eval.json").read_text())
    assert set(result["methods"]) == {"sft", "rto"}
    task_prompts = {r["prompt"] for r in rows(pipeline["task"] / "prompts_eval.jsonl")}
    exported = json.loads((root / "eval" / "exports" / "alpaca_eval" / "rto.json").read_text())
    assert {e["instruction"] for e in exported} <= task_prompts  # never the rendered template
    tok = load_tokenizer(ModelSection(path=str(root / "sft")))
    if tok.chat_template:  # ChatML: the pairs keep replies as text, the prompt as the rows had it
        pair = rows(root / "pairs" / "pairs_train.jsonl")[0]
        assert "<|im_start|>" not in pair["prompt"] and "<|im_end|>" not in pair["chosen"]


def test_every_output_folder_has_a_card_whose_code_loads_the_model(pipeline: dict) -> None:
    import re

    root = pipeline["root"]
    for stage in ("sft", "pairs", "rm", "dpo", "rl", "eval"):
        card = (root / stage / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers") and f"rto {stage}" in card
        assert "## Reproduce" in card
    card = (root / "rl" / "README.md").read_text()
    assert str(root / "sft") in card and "rl.dpo_reward.scale" in card and "rollout/kl" in card
    for stage in ("rl", "rm"):
        code = re.search(r"```python\n(.*?)```", (root / stage / "README.md").read_text(), re.S)
        scope: dict = {}
        exec(code.group(1), scope)  # the card's own loading code works as written
        assert scope["model"] is not None and scope["tokenizer"] is not None


def test_push_to_hub_uploads_the_folder_without_checkpoints(
    pipeline: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import huggingface_hub

    calls: dict = {}

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls["create"] = repo_id

        def upload_folder(self, **kw):
            calls["upload"] = kw

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    folder = tmp_path / "rm"
    shutil.copytree(pipeline["root"] / "rm", folder)
    from rto.engine.card import push_to_hub

    assert push_to_hub(folder, "me/my-rm") == "https://huggingface.co/me/my-rm"
    assert calls["create"] == "me/my-rm" and calls["upload"]["folder_path"] == str(folder)
    assert "checkpoints/*" in calls["upload"]["ignore_patterns"]
    assert 'from_pretrained("me/my-rm")' in (folder / "README.md").read_text()


def test_a_users_own_readme_is_never_replaced(tmp_path: Path) -> None:
    from rto.engine.card import write_card

    (tmp_path / "README.md").write_text("my notes\n")
    (tmp_path / "summary.json").write_text('{"stage": "sft"}')
    write_card(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my notes\n"


@pytest.mark.parametrize("task", ["tiny_task", *ARCHS])
def test_response_log_probs_skip_the_prompts_logits_without_changing_them(
    request: pytest.FixtureRequest, task: str
) -> None:
    """The padded pass puts only the response's positions through the output layer (a model's
    own `logits_to_keep`): its log-probs equal those read from the whole sequence's logits,
    with either padding; a model whose forward lacks `logits_to_keep` gets the slice."""
    from rto.models.forward import PADDED, causal_logits, gather_logprobs, response_logprobs

    model = load_causal_lm(ModelSection(path=str(request.getfixturevalue(task) / "base_model")))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 300, (3, 7), generator=gen)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[0, :3] = 0  # left padding
    response = torch.randint(5, 300, (3, 5), generator=gen)
    response_mask = torch.ones_like(response)
    response_mask[1, 3:] = 0  # right padding
    ids, mask = torch.cat([prompt, response], 1), torch.cat([prompt_mask, response_mask], 1)
    with torch.no_grad():
        whole = causal_logits(model, ids, mask)[:, 6:-1]
        cut, _ = response_logprobs(
            model, prompt, prompt_mask, response, response_mask, layout=PADDED
        )
        expected = gather_logprobs(whole, response) * response_mask
        torch.testing.assert_close(cut, expected, rtol=1e-6, atol=1e-6)  # equal bit for bit on CPU

        class NoKeep(torch.nn.Module):  # a forward without logits_to_keep
            def forward(self, input_ids, attention_mask, position_ids, use_cache):  # type: ignore[no-untyped-def]
                return model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=use_cache)  # fmt: skip

        sliced = causal_logits(NoKeep(), ids, mask, last=6)[:, :-1]
        torch.testing.assert_close(sliced, whole, rtol=0, atol=0)
