"""The group estimators (rloo, grpo, reinforce_pp_baseline) and the k3 KL loss against slow,
obvious loops over groups and tokens: ragged lengths, K = 2, groups whose rewards are all equal,
and K = 1 refused; the reward with the KL in the loss has no KL term."""

from __future__ import annotations

import math

import pytest
import torch

from rto.rl.advantages import estimate
from rto.rl.losses import kl_loss
from rto.rl.rewards import RewardSettings, SourceSettings, sentence_part, token_rewards

# two groups of K = 3 (ragged) and one of K = 2; T = 6
LENGTHS = [4, 1, 6, 3, 5, 2, 6, 2]
GROUPS = [7, 7, 7, 2, 2, 2, 9, 9]  # ids as the trainer makes them: any integers, members adjacent
T = 6


def batch(seed: int = 0, *, equal_sentence: bool = False, equal_dense: bool = False):
    g = torch.Generator().manual_seed(seed)
    B = len(LENGTHS)
    mask = torch.zeros(B, T)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    dense = torch.randn(B, T, generator=g, dtype=torch.float64)
    sentence = torch.randn(B, generator=g, dtype=torch.float64)
    if equal_sentence:
        sentence = torch.full((B,), 0.1, dtype=torch.float64)  # 0.1: not exact in binary
    if equal_dense:
        dense = torch.full((B, T), 0.3, dtype=torch.float64)
    dense = dense * mask + torch.where(mask.bool(), 0.0, float("nan"))  # padding is never read
    rewards = dense.clone()
    for b, n in enumerate(LENGTHS):
        rewards[b, n - 1] += sentence[b]
    return rewards, sentence, torch.tensor(GROUPS), mask, dense


def members(i: int) -> list[int]:
    return [j for j in range(len(GROUPS)) if GROUPS[j] == GROUPS[i]]


def mean(xs):
    return sum(xs) / len(xs)


def std(xs):  # unbiased
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def to_go(shaped: list[list[float]], gamma: float) -> list[list[float]]:
    out = []
    for row in shaped:
        acc, back = 0.0, []
        for x in reversed(row):
            acc = x + gamma * acc
            back.append(acc)
        out.append(back[::-1])
    return out


def reference(name: str, dense, sentence, *, gamma: float = 1.0, std_norm: bool = True):
    """The papers' formulas, one response and one token at a time."""
    d = [[float(dense[i, t]) for t in range(n)] for i, n in enumerate(LENGTHS)]
    s = [float(x) for x in sentence]
    shaped = []
    for i in range(len(LENGTHS)):
        others = [j for j in members(i) if j != i]
        group = members(i)
        same_s = len({s[j] for j in group}) == 1
        if name == "rloo":  # PRIME eq. 5
            s_adv = s[i] - mean([s[j] for j in others])
            base = mean([mean(d[j]) for j in others])  # the others' mean per-token reward
            row = [x - base for x in d[i]]
        elif name == "grpo":  # DeepSeekMath 4.1.2 (outcome) + 4.1.3 (process)
            s_adv = s[i] - mean([s[j] for j in group])
            tokens = [x for j in group for x in d[j]]
            row = [x - mean(tokens) for x in d[i]]
            if std_norm:
                s_adv /= std([s[j] for j in group]) + 1e-6
                row = [x / (std(tokens) + 1e-6) for x in row]
            if len(set(tokens)) == 1:
                row = [0.0] * len(row)
        else:  # reinforce_pp_baseline
            s_adv = s[i] - mean([s[j] for j in group])
            row = list(d[i])
        if same_s:
            s_adv = 0.0
        row[-1] += s_adv
        shaped.append(row)
    return to_go(shaped, gamma)


def run(name, rewards, sentence, group, mask, **kw):
    return estimate(name, rewards, None, mask, gamma=kw.pop("gamma", 1.0), lam=0.95,
                    sentence=sentence, group=group, **kw)  # fmt: skip


def assert_matches(adv, ref, mask):
    assert torch.isfinite(adv).all()
    for i, n in enumerate(LENGTHS):
        assert adv[i, :n].tolist() == pytest.approx(ref[i], abs=1e-9)
        assert (adv[i, n:] == 0).all()


@pytest.mark.parametrize("name", ["rloo", "grpo", "reinforce_pp_baseline"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_group_estimators_match_the_slow_loop(name: str, gamma: float) -> None:
    rewards, sentence, group, mask, dense = batch()
    adv, returns = run(name, rewards, sentence, group, mask, gamma=gamma)
    assert_matches(adv, reference(name, dense, sentence, gamma=gamma), mask)
    assert torch.equal(adv, returns)


def test_dr_grpo_only_subtracts_the_group_mean() -> None:
    rewards, sentence, group, mask, dense = batch(1)
    adv, _ = run("grpo", rewards, sentence, group, mask, std_normalization=False)
    assert_matches(adv, reference("grpo", dense, sentence, std_norm=False), mask)


@pytest.mark.parametrize("name", ["rloo", "grpo", "reinforce_pp_baseline"])
def test_groups_of_equal_sentence_rewards_get_exactly_zero(name: str) -> None:
    """Equal sentence rewards: exactly 0 sentence advantage (not rounding noise, not NaN)."""
    rewards, sentence, group, mask, dense = batch(2, equal_sentence=True, equal_dense=True)
    adv, _ = run(name, rewards, sentence, group, mask)
    assert_matches(adv, reference(name, dense, sentence), mask)
    if (
        name == "grpo"
    ):  # equal dense rewards too: nothing to prefer (up to the subtraction's rounding)
        assert adv.abs().max() < 1e-9
    only_sentence = torch.zeros_like(rewards)
    for b, n in enumerate(LENGTHS):
        only_sentence[b, n - 1] = sentence[b]
    adv, _ = run(name, only_sentence, sentence, group, mask)
    assert (adv == 0).all()


def test_grpo_with_only_a_sentence_reward_is_plain_grpo() -> None:
    """No dense part (beta1 = 0, KL in the loss): every token gets (s - mean) / std of its group,
    GRPO's outcome supervision."""
    _, sentence, group, mask, _ = batch(3)
    rewards = torch.zeros(len(LENGTHS), T, dtype=torch.float64)
    for b, n in enumerate(LENGTHS):
        rewards[b, n - 1] = sentence[b]
    adv, _ = run("grpo", rewards, sentence, group, mask)
    for i, n in enumerate(LENGTHS):
        s = [float(sentence[j]) for j in members(i)]
        want = (float(sentence[i]) - mean(s)) / (std(s) + 1e-6)
        assert adv[i, :n].tolist() == pytest.approx([want] * n, abs=1e-12)


def test_sentence_part_is_what_lands_on_the_last_token_besides_token_sources() -> None:
    rewards, sentence, group, mask, dense = batch(4)
    mask32 = mask.float()
    lp = torch.randn(len(LENGTHS), T)
    lr = torch.randn(len(LENGTHS), T)
    x = torch.randn(len(LENGTHS), T)
    score = torch.randn(len(LENGTHS))
    fn = torch.rand(len(LENGTHS))
    r, parts = token_rewards(mask32, lp, lr, score, RewardSettings(0.1, 2.0),
                             sources={"dpo": (x, SourceSettings(0.5))}, sentence={"reward_fn": (fn, 3.0)})  # fmt: skip
    s = sentence_part(parts)
    assert torch.allclose(s, 2.0 * score + 3.0 * fn)
    dense_only = r.clone()
    for b, n in enumerate(LENGTHS):
        dense_only[b, n - 1] -= s[b]
    assert torch.allclose(dense_only, (0.5 * x - 0.1 * (lp - lr)) * mask32, atol=1e-6)


def test_a_group_estimator_with_one_response_per_prompt_is_refused(
    capsys: pytest.CaptureFixture,
) -> None:
    """K = 1 under a group estimator: exit 2, no traceback, the key named, before any work."""
    from conftest import rto

    base = [
        "rl",
        "--out",
        "o",
        "--model.path",
        "m",
        "--data.path",
        "d",
        "--reward_model",
        "rm",
        "--dpo_model",
        "p",
    ]
    for extra in (["--preset", "grpo"], ["--preset", "rloo"],
                  ["--rl.advantage_estimator", "reinforce_pp_baseline"]):  # fmt: skip
        assert rto(*base, *extra, "--rl.samples_per_prompt", "1") == 2
        err = capsys.readouterr().err
        assert "config key 'rl.samples_per_prompt' must be at least 2" in err
        assert "Traceback" not in err


def test_k3_kl_loss_against_a_hand_computation() -> None:
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    terms = []
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                l_ = float(ref[b, t] - logp[b, t])
                terms.append(math.exp(l_) - l_ - 1)
    assert float(kl_loss(logp, ref, mask)) == pytest.approx(sum(terms) / 4, rel=1e-6)
    assert float(kl_loss(logp, ref, mask, num_tokens=8)) == pytest.approx(sum(terms) / 8, rel=1e-6)
    assert float(kl_loss(ref, ref, mask)) == 0.0  # identical policies: no KL
    # its gradient is the k3 estimator's: d/d logp = 1 - exp(ref - logp)
    lp = logp.clone().requires_grad_(True)
    kl_loss(lp, ref, mask).backward()
    want = (1 - torch.exp(ref - logp)) * mask / 4
    assert torch.allclose(lp.grad, want, atol=1e-6)


def test_with_the_kl_in_the_loss_the_reward_has_no_kl_term() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    lp, lr = torch.randn(2, 3), torch.randn(2, 3)
    score = torch.tensor([0.7, -0.2])
    x = torch.randn(2, 3)
    dpo = {"dpo": (x, SourceSettings(0.05))}
    out, _ = token_rewards(
        mask, lp, lr, score, RewardSettings(0.3, 1.0, kl_in_reward=False), sources=dpo
    )
    same, _ = token_rewards(
        mask, lp + 5.0, lr, score, RewardSettings(0.3, 1.0, kl_in_reward=False), sources=dpo
    )
    assert torch.equal(out, same)  # the policy's log-probs do not enter the reward at all
    no_kl, _ = token_rewards(mask, lp, lr, score, RewardSettings(0.0, 1.0), sources=dpo)
    assert torch.equal(out, no_kl)
    with_kl, _ = token_rewards(mask, lp, lr, score, RewardSettings(0.3, 1.0), sources=dpo)
    assert torch.allclose(with_kl - out, -0.3 * (lp - lr) * mask)
