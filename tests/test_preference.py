"""The preference stages: each DPO-family loss against a slow loop over unpadded sequences, the
reward model's score read at the last real token whatever the padding, the DPO token reward, and
the quick stages on the built-in task with their bad-input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rto.config.stages import DPOConfig
from rto.data.tokenize import collate_pairs, pad
from rto.errors import ModelError
from rto.models.forward import TokenScorer, sequence_scores
from rto.stages.dpo import PreferenceObjective

from conftest import PREF_COMMON, rto, rto_ok

VOCAB = 40
# ragged prompts and responses; pair 2 has a one-token rejected response
PAIRS = [
    {"prompt_ids": [3, 4, 5], "chosen_ids": [6, 7, 8, 2], "rejected_ids": [9, 2]},
    {"prompt_ids": [10], "chosen_ids": [11, 12, 2], "rejected_ids": [13, 14, 15, 16, 2]},
    {"prompt_ids": [17, 18, 19, 20, 21], "chosen_ids": [22, 2], "rejected_ids": [2]},
]


def tiny_lm(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def slow_stats(model, prompt: list[int], response: list[int], ref=None):
    """(sum of log-probs, sum over tokens of KL(ref || model)) by one unpadded forward."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0]
        ref_logits = ref(ids).logits[0] if ref is not None else None
    total, kl = 0.0, 0.0
    for h, tok in enumerate(response):
        pos = len(prompt) + h - 1
        logp = torch.log_softmax(logits[pos].double(), -1)
        total += float(logp[tok])
        if ref_logits is not None:
            rlogp = torch.log_softmax(ref_logits[pos].double(), -1)
            kl += float((rlogp.exp() * (rlogp - logp)).sum())
    return total, kl


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def slow_loss(kind: str, beta: float, alpha: float, gamma: float, policy, ref) -> float:
    losses = []
    for p in PAIRS:
        pw, kw = slow_stats(policy, p["prompt_ids"], p["chosen_ids"], ref)
        pl, kl_l = slow_stats(policy, p["prompt_ids"], p["rejected_ids"], ref)
        rw, _ = slow_stats(ref, p["prompt_ids"], p["chosen_ids"])
        rl, _ = slow_stats(ref, p["prompt_ids"], p["rejected_ids"])
        nw, nl = len(p["chosen_ids"]), len(p["rejected_ids"])
        u = beta * ((pw - rw) - (pl - rl))
        if kind == "dpo":
            loss = -math.log(sigmoid(u))
        elif kind == "ipo":
            loss = ((pw - rw) / nw - (pl - rl) / nl - 1 / (2 * beta)) ** 2
        elif kind == "rdpo":  # Park et al. 2024, eq. 9: the length term is added
            loss = -math.log(sigmoid(u + (alpha * nw - alpha * nl)))
        elif kind == "simpo":
            loss = -math.log(sigmoid(beta * (pw / nw - pl / nl) - gamma))
        else:  # tdpo
            loss = -math.log(sigmoid(u - alpha * (beta * kl_l - beta * kw)))
        losses.append(loss)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("kind", ["dpo", "ipo", "rdpo", "simpo", "tdpo"])
def test_each_loss_matches_slow_loop(kind: str) -> None:
    policy, ref = tiny_lm(0), tiny_lm(1)
    cfg = DPOConfig(loss=kind)
    objective = PreferenceObjective(cfg, ref)
    batch = collate_pairs(PAIRS, pad_id=0)
    with torch.no_grad():
        loss_sum, metrics = objective(policy, batch)
    want = slow_loss(kind, cfg.resolved_beta, cfg.resolved_alpha, cfg.resolved_gamma, policy, ref)
    assert objective.count(batch) == len(PAIRS)  # the engine divides the sum by the step's pairs
    assert float(loss_sum) / len(PAIRS) == pytest.approx(want, rel=1e-4)
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected"}  # fmt: skip


def test_rdpo_credits_a_longer_chosen_response_with_part_of_the_margin() -> None:
    """R-DPO with a longer chosen response has a lower loss than DPO on the same pair (and a
    longer rejected one a higher loss): the policy needs less margin to explain the preference."""
    policy, ref = tiny_lm(0), tiny_lm(1)
    batch = collate_pairs(PAIRS[:2], pad_id=0)  # pair 0: chosen longer; pair 1: rejected longer
    with torch.no_grad():
        dpo = PreferenceObjective(DPOConfig(loss="dpo"), ref).stats(policy, batch)
        from rto.preference.losses import preference_loss

        plain, _, _ = preference_loss("dpo", dpo, beta=0.1)
        rdpo, _, _ = preference_loss("rdpo", dpo, beta=0.1, alpha=0.5)
    assert rdpo[0] < plain[0] and rdpo[1] > plain[1]


def test_simpo_margin_as_a_ratio_of_beta() -> None:
    """SimPO's code takes the margin as gamma / beta; 0.55 with beta 2.5 is gamma 1.375."""
    policy = tiny_lm(0)
    batch = collate_pairs(PAIRS, pad_id=0)
    ratio = DPOConfig(loss="simpo", simpo_gamma_beta_ratio=0.55)
    absolute = DPOConfig(loss="simpo", simpo_gamma=1.375)
    assert ratio.resolved_gamma == pytest.approx(1.375)
    with torch.no_grad():
        a = PreferenceObjective(ratio, None)(policy, batch)[0]
        b = PreferenceObjective(absolute, None)(policy, batch)[0]
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_precomputed_reference_gives_the_same_loss() -> None:
    from rto.models.forward import Layout
    from rto.stages.dpo import precompute_reference

    policy, ref = tiny_lm(0), tiny_lm(1)
    examples = [dict(p) for p in PAIRS]
    precompute_reference(ref, examples, pad_id=0, batch_size=2, device="cpu", passes=Layout())
    with torch.no_grad():
        live = PreferenceObjective(DPOConfig(), ref)(policy, collate_pairs(PAIRS, 0))[0]
        cached = PreferenceObjective(DPOConfig(), None)(policy, collate_pairs(examples, 0))[0]
    assert float(cached) == pytest.approx(float(live), rel=1e-5)


def test_reward_score_is_read_at_last_real_token_whatever_the_padding() -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, num_labels=1, pad_token_id=2)  # fmt: skip
    scorer = TokenScorer(LlamaForSequenceClassification(cfg).eval())
    seqs = [
        [5, 6, 7, 2],
        [8, 2],
        [9, 10, 11, 12, 13, 2],
    ]  # end with EOS = pad id 2: the classic trap
    with torch.no_grad():
        alone = [float(scorer(torch.tensor([s]), torch.ones(1, len(s)))[0, -1]) for s in seqs]
        for side in ("left", "right"):
            ids, mask = pad(seqs, pad_id=2, side=side)
            got = sequence_scores(scorer, ids, mask).tolist()
            assert got == pytest.approx(alone, abs=1e-5), side


def test_dpo_token_rewards_match_per_sequence_log_ratios() -> None:
    from rto.rl.roles import SeparateModels
    from rto.rl.sources import dpo_log_ratio

    dpo, ref = tiny_lm(0), tiny_lm(1)
    prompts, responses = [[3, 4, 5], [6]], [[7, 8, 2], [9, 10, 11, 12]]
    p_ids, p_mask = pad(prompts, 0, side="left")
    r_ids, r_mask = pad(responses, 0, side="right")
    roles = SeparateModels(policy=ref, ref=ref, dpo=dpo)
    batch = {
        "prompt_ids": p_ids,
        "prompt_mask": p_mask,
        "response_ids": r_ids,
        "response_mask": r_mask,
    }
    got = 0.1 * dpo_log_ratio(roles, batch)  # RTO's token reward with beta1 = 0.1
    assert got.shape == r_ids.shape
    for b, (p, r) in enumerate(zip(prompts, responses)):
        for h in range(len(r)):
            lp_d, _ = slow_stats(dpo, p + r[:h], [r[h]])
            lp_r, _ = slow_stats(ref, p + r[:h], [r[h]])
            assert float(got[b, h]) == pytest.approx(0.1 * (lp_d - lp_r), abs=1e-5)
        assert torch.all(got[b, len(r) :] == 0)


# --------------------------------------------------------------------------- the stages on the built-in task


def test_pairs_rm_and_dpo_on_the_tiny_task(
    pairs_data: Path, reward_model: Path, dpo_model: Path
) -> None:
    pairs = json.loads((pairs_data / "summary.json").read_text())
    assert pairs["pairs_train"] > 100 and 0.7 < pairs["gold_accuracy_eval"] <= 1.0
    row = json.loads((pairs_data / "pairs_train.jsonl").read_text().splitlines()[0])
    assert set(row) == {"prompt", "chosen", "rejected", "chosen_gold", "rejected_gold"}
    # held-out accuracy better than a coin's by two standard errors on these pairs (the exact
    # number moves with the CPU's float rounding; the gold reward's own, the ceiling, is ~0.75)
    rm = json.loads((reward_model / "summary.json").read_text())
    n = rm["data"]["eval"]["rows"]
    assert rm["eval/accuracy"] > 0.5 + 2 * (0.25 / n) ** 0.5 and "eval/gold_accuracy" in rm
    stats = json.loads((reward_model / "reward_stats.json").read_text())
    assert stats["std"] > 0
    dpo = json.loads((dpo_model / "summary.json").read_text())
    assert dpo["eval/rewards/accuracies"] > 0.5 + 2 * (0.25 / n) ** 0.5 and dpo["beta"] == 0.1
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(reward_model).config.num_labels == 1


def test_reward_model_on_a_share_of_the_pairs(
    sft_model: Path, pairs_data: Path, tmp_path: Path
) -> None:
    """`rto rm --data.train_fraction 0.25`: trained on a quarter of the pairs, judged on all the
    held-out pairs (how the token-reward study makes noisier reward models)."""
    n_pairs = len((pairs_data / "pairs_train.jsonl").read_text().splitlines())
    rto_ok("rm", "--out", tmp_path / "rm", "--model.path", sft_model,
           "--data.path", pairs_data / "pairs_train.jsonl", "--data.eval_path", pairs_data / "pairs_eval.jsonl",
           "--data.train_fraction", "0.25", "--train.max_steps", "1", "--train.batch_size", "8",
           "--train.micro_batch_size", "8", *PREF_COMMON)  # fmt: skip
    summary = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert summary["data"]["train"]["rows"] == round(n_pairs / 4)
    n_eval = len((pairs_data / "pairs_eval.jsonl").read_text().splitlines())
    assert summary["data"]["eval"]["rows"] == n_eval


def test_reward_model_folder_without_score_head_is_refused(sft_model: Path) -> None:
    from rto.config.sections import ModelSection
    from rto.models.load import load_sequence_scorer

    with pytest.raises(ModelError, match="has no score head .*train one with `rto rm`"):
        load_sequence_scorer(
            ModelSection(path=str(sft_model)),
            str(sft_model),
            trainable=False,
            require_head=True,
            role="reward model",
        )


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import TINY_TASK, rto_ok

    out = tmp_path_factory.mktemp("other")
    args = list(TINY_TASK)
    args[args.index("--vocab_size") + 1] = "420"
    rto_ok("task", "sentiment", "--out", out, *args)
    return out / "base_model"


def test_dpo_refuses_a_reference_with_another_tokenizer(sft_model: Path, pairs_data: Path, other_tokenizer_model: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    code = rto("dpo", "--out", tmp_path / "d", "--model.path", sft_model, "--ref_model", other_tokenizer_model,
               "--data.path", pairs_data / "pairs_train.jsonl", *PREF_COMMON)  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert (
        "policy" in err
        and "reference model" in err
        and "different tokenizers (vocabulary sizes 400 and 420)" in err
    )
