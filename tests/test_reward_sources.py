"""Rewards from anywhere, end to end on the tiny task: a reward model with its own tokenizer (and
chat template) in `rto rl` and `rto eval`, a programmatic sentence reward (`--reward_fn`), and a
user's token reward function as the only dense reward."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from rto.config.sections import ModelSection
from rto.data.sources import Rows
from rto.data.tokenize import build_pairs, collate_pairs, encode_scored, load_prompts
from rto.models.forward import TokenScorer, sequence_scores
from rto.models.generate import decode_responses, sample, stop_ids
from rto.models.load import load_causal_lm, load_sequence_scorer, load_tokenizer, save_pretrained
from rto.models.reward_model import load_reward_model
from rto.rl.experience import merge_samples, score_rollout
from rto.rl.roles import SeparateModels

from conftest import TINY_TASK, rl_args, rto, rto_ok


def build_foreign_rm(root: Path, *task_args: str) -> Path:
    """A reward model on another tokenizer: `rto task sentiment --vocab_size 300 --seed 1`'s base
    model with a score head (random, large enough that scores differ between texts)."""
    args = list(TINY_TASK)
    args[args.index("--vocab_size") + 1] = "300"
    args[args.index("--max_positions") + 1] = "128"  # a smaller vocabulary: longer texts in tokens
    rto_ok("task", "sentiment", "--out", root / "task", "--seed", "1", *args, *task_args)
    section = ModelSection(path=str(root / "task" / "base_model"))
    hf = load_sequence_scorer(
        section, section.path, trainable=False, require_head=False, role="reward model"
    )
    torch.manual_seed(0)
    torch.nn.init.normal_(hf.score.weight, std=1.0)
    save_pretrained(hf, load_tokenizer(section), root / "rm")
    return root / "rm"


@pytest.fixture(scope="module")
def plain_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_foreign_rm(tmp_path_factory.mktemp("plain_rm"))


@pytest.fixture(scope="module")
def chat_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_foreign_rm(
        tmp_path_factory.mktemp("chat_rm"), "--arch", "qwen2", "--chat_template", "chatml"
    )


def direct_scores(rm: Path, prompts: list[str], responses: list[str]) -> list[float]:
    """The reward model given the text directly, as `rto rm` reads a preference row (so the
    responses must not be empty: `rto rm` drops such rows)."""
    section = ModelSection(path=str(rm))
    tok = load_tokenizer(section)
    rows = [{"prompt": p, "chosen": r, "rejected": r + " x"} for p, r in zip(prompts, responses)]
    pairs, report = build_pairs(
        Rows(rows, "direct"), tok, max_length=1024, max_prompt_length=512, source=str(rm)
    )
    assert report.kept == len(rows)
    scorer = TokenScorer(
        load_sequence_scorer(section, str(rm), trainable=False, require_head=True, role="rm")
    )
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        return sequence_scores(scorer, batch["input_ids"], batch["attention_mask"])[
            : len(rows)
        ].tolist()


@pytest.mark.parametrize("rm_name", ["plain_rm", "chat_rm"])
def test_a_reward_model_with_its_own_tokenizer_scores_as_given_the_text_directly(
    request: pytest.FixtureRequest, rm_name: str, tiny_task: Path, sft_model: Path
) -> None:
    rm = request.getfixturevalue(rm_name)
    section = ModelSection(path=str(sft_model))
    tok = load_tokenizer(section)
    prompts, _ = load_prompts(str(tiny_task / "prompts_eval.jsonl"), "train", tok, max_rows=12,
                              max_prompt_length=32, seed=0, source=str(sft_model))  # fmt: skip
    policy = load_causal_lm(section, trainable=False)
    eos = stop_ids(tok, policy)
    torch.manual_seed(0)
    samples = sample(policy, [p["prompt_ids"] for p in prompts], pad_id=tok.pad_token_id, eos=eos,
                     max_new_tokens=24)  # fmt: skip
    r = merge_samples([samples], tok.pad_token_id)
    r.texts["prompt_values"] = [p["prompt_value"] for p in prompts]
    r.texts["responses"] = responses = decode_responses(tok, r, eos)
    reward_model = load_reward_model(section, str(rm), tok, chat_prompts="auto", device="cpu")
    assert not reward_model.same_tokenizer
    roles = SeparateModels(policy=policy, ref=policy, reward_model=reward_model)
    score_rollout(r, roles, batch_size=5, temperature=1.0)  # the RL scoring pass, in chunks
    said = [i for i, text in enumerate(responses) if text.strip()]
    assert len(said) >= 8
    want = direct_scores(rm, [prompts[i]["prompt"] for i in said], [responses[i] for i in said])
    assert torch.allclose(r.score[said], torch.tensor(want), atol=1e-5)
    assert r.score.std() > 0.1  # a reward model that tells the texts apart
    rm_tok = reward_model.tokenizer
    (ids,), _ = encode_scored(
        rm_tok, reward_model.render, [prompts[0]["prompt_value"]], [responses[0]]
    )
    text = rm_tok.decode(ids)
    if rm_name == "chat_rm":  # its chat template is applied, the reply closed at its end of turn
        user = [{"role": "user", "content": prompts[0]["prompt"]}]
        assert text == rm_tok.apply_chat_template(
            user, tokenize=False, add_generation_prompt=True
        ) + (responses[0] + "<|im_end|>")
    else:  # a base model's tokenizer: plain text and its EOS, as `rto rm` trains it
        assert text == prompts[0]["prompt"] + responses[0] + rm_tok.eos_token


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_rl_and_eval_with_a_chat_reward_model_on_another_tokenizer(
    tiny_task: Path, sft_model: Path, dpo_model: Path, chat_rm: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    out = tmp_path / "rto"
    rto_ok(*rl_args(tiny_task, sft_model, chat_rm, dpo_model, out, "--preset", "rto", "--train.max_steps", "2",
                    "--rl.score.normalization", "running"))  # fmt: skip
    err = capsys.readouterr().err
    assert "critic starts from the policy" in err and "its own tokenizer" in err
    assert "re-rendered with its chat template" in err
    row = rows(out / "metrics.jsonl")[-1]
    assert row["reward/score_share"] > 0 and row["reward/dpo_share"] > 0 and "value/loss" in row
    assert json.loads((out / "summary.json").read_text())["rewards"] == ["dpo", "score"]

    rto_ok("eval", "--out", tmp_path / "eval", "--policies", f"sft={sft_model},rto={out}", "--reward_model", chat_rm,
           "--eval.prompts", tiny_task / "prompts_eval.jsonl", "--eval.num_prompts", "16",
           "--generate.max_new_tokens", "24", "--log.progress", "false")  # fmt: skip
    records = [
        r for r in rows(tmp_path / "eval" / "generations" / "rto.jsonl") if r["response"].strip()
    ]
    want = direct_scores(chat_rm, [r["prompt"] for r in records], [r["response"] for r in records])
    assert [r["rm_score"] for r in records] == pytest.approx(want, abs=1e-5)


def test_the_dpo_model_must_still_share_the_policys_tokenizer(
    tiny_task: Path, sft_model: Path, chat_rm: Path, reward_model: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    other_dpo = chat_rm.parent / "task" / "base_model"
    code = rto(
        *rl_args(tiny_task, sft_model, reward_model, other_dpo, tmp_path / "o", "--preset", "rto")
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "DPO model" in err and "rewards are per policy token" in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_a_reward_function_as_the_sentence_reward(
    tiny_task: Path, sft_model: Path, dpo_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """RTO with DPO token rewards plus the task's gold reward as an oracle sentence reward (a
    registered name, as for judges), and no reward model."""
    out = tmp_path / "oracle"
    rto_ok(*rl_args(tiny_task, sft_model, "", dpo_model, out, "--preset", "rto", "--reward_fn", "sentiment",
                    "--rl.reward_fn.coef", "2", "--eval.gold_reward", "sentiment", "--train.max_steps", "2"))  # fmt: skip
    assert "there is no reward model" in capsys.readouterr().err
    for row in rows(out / "metrics.jsonl"):  # the reward is the gold reward of the same responses
        assert row["reward/reward_fn_sum"] == pytest.approx(
            2 * row["rollout/gold_reward"], abs=1e-6
        )
        assert "reward/score_sum" not in row
    assert json.loads((out / "summary.json").read_text())["rewards"] == ["dpo", "reward_fn"]


USER_MODULE = '''
import re

def sentiment_words(prompts, responses, tokens):
    """+1 on each positive word, -1 on each negative word, as character spans."""
    words = {"good": 1.0, "great": 1.0, "nice": 1.0, "bad": -1.0, "awful": -1.0, "rude": -1.0}
    pattern = r"\\b(" + "|".join(words) + r")\\b"
    return [[(m.start(), m.end(), words[m.group()]) for m in re.finditer(pattern, r)] for r in responses]
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_token_rewards.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_token_rewards:sentiment_words"


def test_rto_with_a_user_token_function_as_its_only_reward(
    tiny_task: Path,
    sft_model: Path,
    reward_model: Path,
    dpo_model: Path,
    user_module: str,
    tmp_path: Path,
) -> None:
    """The `function` source alone (DPO off, no sentence reward) trains the policy end to end;
    with its coefficient 0 it is removed exactly: bit-identical to PPO."""
    from test_rl_stage import same_weights

    only = tmp_path / "function_only"
    rto_ok(*rl_args(tiny_task, sft_model, "", "", only, "--rl.dpo_reward.scale", "0", "--rl.score.coef", "0",
                    "--token_reward_fn", user_module, "--train.max_steps", "2"))  # fmt: skip
    metrics = rows(only / "metrics.jsonl")[-1]
    assert metrics["reward/function_share"] > 0 and "reward/dpo_sum" not in metrics
    assert metrics["reward/function_share"] + metrics["reward/kl_share"] == pytest.approx(1.0)
    assert json.loads((only / "summary.json").read_text())["rewards"] == ["function"]
    assert not same_weights(only, sft_model)

    common = ["--preset", "ppo", "--train.max_steps", "2"]
    rto_ok(*rl_args(tiny_task, sft_model, reward_model, dpo_model, tmp_path / "ppo", *common))
    rto_ok(*rl_args(tiny_task, sft_model, reward_model, dpo_model, tmp_path / "fn0", *common,
                    "--token_reward_fn", user_module, "--rl.token_reward_fn.scale", "0"))  # fmt: skip
    assert same_weights(tmp_path / "ppo", tmp_path / "fn0")


def test_a_token_function_that_cannot_be_imported_is_refused_before_loading(
    tiny_task: Path,
    sft_model: Path,
    reward_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    code = rto(*rl_args(tiny_task, sft_model, reward_model, "", tmp_path / "o", "--preset", "ppo",
                        "--token_reward_fn", "no_such_module_here:f"))  # fmt: skip
    assert code == 2
    assert "token_reward_fn" in capsys.readouterr().err


class LearningSource:
    """A token-reward source that keeps learning, registered from outside rto: every token gets
    the number of rollouts it has learned from (times its scale); that count is its state."""

    name = "learning"
    model = None

    def __init__(self) -> None:
        from rto.rl.rewards import SourceSettings

        self.settings = SourceSettings(scale=0.01)
        self.seen = 0

    def __call__(self, r) -> torch.Tensor:
        return torch.full(r.response_ids.shape, float(self.seen), device=r.response_ids.device)

    def learn(self, r) -> dict[str, float]:
        self.seen += 1
        return {"seen": self.seen, "responses": len(r)}

    def state_dict(self) -> dict[str, int]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seen = state["seen"]


def test_a_learning_token_reward_source_slots_in_without_touching_the_trainer(
    tiny_task: Path, sft_model: Path, reward_model: Path, dpo_model: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A source registered with rl.sources.register is computed, placed, logged, taught every
    rollout and checkpointed: a run stopped by a failed checkpoint and resumed ends as the
    uninterrupted run does."""
    from rto.rl import sources

    monkeypatch.setitem(sources.REGISTRY, "learning", lambda cfg, ctx: LearningSource())
    extra = ("--preset", "ppo", "--train.max_steps", "3", "--train.save_every", "1")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    rto_ok(*rl_args(tiny_task, sft_model, reward_model, dpo_model, whole, *extra))
    logged = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in logged if "source/learning/seen" in row]
    assert [row["source/learning/seen"] for row in steps] == [1.0, 2.0, 3.0]
    # the first rollout's values are 0 (nothing learned yet); later ones add 0.01 * seen a token
    assert steps[0]["reward/learning_sum"] == 0.0
    length = steps[1]["rollout/response_length"]
    assert steps[1]["reward/learning_sum"] == pytest.approx(0.01 * length, rel=1e-5)

    monkeypatch.setenv("RTO_FAULT", "disk_full_during_save:2")
    assert rto(*rl_args(tiny_task, sft_model, reward_model, dpo_model, stopped, *extra)) == 2
    monkeypatch.delenv("RTO_FAULT")
    rto_ok(*rl_args(tiny_task, sft_model, reward_model, dpo_model, stopped, *extra, "--resume"))
    resumed = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert resumed[-1]["source/learning/seen"] == 3.0
    assert resumed[-1]["reward/learning_sum"] == logged[-1]["reward/learning_sum"]
