"""The RL maths against slow, obvious reference loops: reward placement, the variants' defining
properties, GAE, REINFORCE++ returns, whitening and the clipped losses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from rto.rl.advantages import gae, reward_to_go, whiten
from rto.rl.losses import policy_loss, sampler_weights, value_loss
from rto.rl.rewards import (
    RewardSettings,
    SourceSettings,
    normalize_score,
    reward_breakdown,
    token_rewards,
)


@dataclass
class Variant:
    """A variant of the paper's reward as the RL config sets it: the DPO source's settings
    (beta1, clip, granularity, shaping), beta2 and beta3."""

    dpo_reward_scale: float = 0.05
    dpo_reward_clip: float | None = None
    granularity: str = "token"
    shaping: bool = False
    kl_coef: float = 0.01
    score_coef: float = 1.0

    def dpo(self) -> SourceSettings:
        return SourceSettings(
            self.dpo_reward_scale, self.dpo_reward_clip, self.granularity, self.shaping
        )


def rewards_of(mask, lp, lr, score, v: Variant, ratio=None, *, segment_end=None, sources=None,
               sentence=None):  # fmt: skip
    """token_rewards with the DPO log-ratio as the source 'dpo' (first, as the trainer adds it)."""
    dense = {"dpo": (ratio, v.dpo())} if ratio is not None else {}
    dense.update(sources or {})
    return token_rewards(mask, lp, lr, score, RewardSettings(v.kl_coef, v.score_coef),
                         segment_end=segment_end, sources=dense, sentence=sentence)  # fmt: skip


LENGTHS = [5, 2, 7, 1]  # ragged; row 2 fills all T = 7 columns (truncated without EOS)
T = 7


def make_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = len(LENGTHS)
    mask = torch.zeros(B, T)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    lp = -torch.rand(B, T, generator=g) * 3
    lr = -torch.rand(B, T, generator=g) * 3
    ratio = torch.randn(B, T, generator=g)
    score = torch.randn(B, generator=g)
    # garbage outside the mask must never leak into rewards
    lp = torch.where(mask.bool(), lp, torch.full_like(lp, 1e6))
    ratio = torch.where(mask.bool(), ratio, torch.full_like(ratio, float("nan")))
    return mask, lp, lr, ratio, score


def slow_rewards(mask, lp, lr, ratio, score, s: Variant, segment_end=None):
    B = mask.shape[0]
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = int(mask[b].sum())
        dpo = []
        for h in range(n):
            v = s.dpo_reward_scale * float(ratio[b, h]) if s.dpo_reward_scale else 0.0
            if s.dpo_reward_clip is not None:
                v = max(-s.dpo_reward_clip, min(s.dpo_reward_clip, v))
            dpo.append(v)
        placed = [0.0] * n
        if s.granularity == "token":
            placed = list(dpo)
        elif s.granularity == "sequence":
            placed[n - 1] = sum(dpo)
        else:
            acc = 0.0
            for h in range(n):
                acc += dpo[h]
                if (segment_end is not None and segment_end[b, h]) or h == n - 1:
                    placed[h] = acc
                    acc = 0.0
        if s.shaping:
            placed[n - 1] -= sum(dpo)
        for h in range(n):
            r = placed[h] - s.kl_coef * (float(lp[b, h]) - float(lr[b, h]))
            if h == n - 1:
                r += s.score_coef * float(score[b])
            out[b][h] = r
    return torch.tensor(out)


VARIANTS = {
    "ppo": Variant(dpo_reward_scale=0.0),
    "rto": Variant(dpo_reward_scale=0.05),
    "rto_clip": Variant(dpo_reward_scale=0.5, dpo_reward_clip=0.05),
    "rs_ppo": Variant(dpo_reward_scale=0.05, shaping=True),
    "semi_rto": Variant(dpo_reward_scale=0.05, granularity="segment"),
    "ddpo": Variant(dpo_reward_scale=0.05, granularity="sequence"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_token_rewards_match_slow_loop(name: str) -> None:
    mask, lp, lr, ratio, score = make_batch()
    seg = torch.zeros(mask.shape, dtype=torch.bool)
    seg[0, 1] = seg[2, 2] = seg[2, 4] = True  # sentence delimiters inside responses
    s = VARIANTS[name]
    got, _ = rewards_of(mask, lp, lr, score, s, ratio, segment_end=seg)
    want = slow_rewards(mask, lp, lr, ratio, score, s, seg)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.isfinite(got).all()


def test_score_lands_on_last_real_token_only() -> None:
    mask, lp, _, _, score = make_batch()
    s = Variant(dpo_reward_scale=0.0, kl_coef=0.0)
    got, _ = rewards_of(mask, lp, lp, score, s)
    for b, n in enumerate(LENGTHS):
        assert got[b, n - 1] == pytest.approx(float(score[b]))  # truncated row 2: its last column
        assert torch.count_nonzero(got[b]) == 1  # not on the first pad, not anywhere else


def test_variant_properties() -> None:
    mask, lp, lr, ratio, score = make_batch(1)
    seg = torch.zeros(mask.shape, dtype=torch.bool)
    seg[2, 3] = True
    totals = {}
    dpo_sums = {}
    for name, s in VARIANTS.items():
        r, parts = rewards_of(mask, lp, lr, score, s, ratio, segment_end=seg)
        totals[name] = r.sum(1)
        if "dpo" in parts:
            dpo_sums[name] = parts["dpo"].sum(1)
    assert torch.allclose(
        totals["rs_ppo"], totals["ppo"], atol=1e-5
    )  # pure shaping: same return as PPO
    assert torch.allclose(
        dpo_sums["ddpo"], dpo_sums["rto"], atol=1e-6
    )  # same DPO total, other placement
    assert torch.allclose(dpo_sums["semi_rto"], dpo_sums["rto"], atol=1e-6)
    assert not torch.allclose(totals["rto"], totals["ppo"])


def test_beta1_zero_ignores_the_dpo_model_entirely() -> None:
    mask, lp, lr, ratio, score = make_batch()
    s = Variant(dpo_reward_scale=0.0)
    with_nan, parts = rewards_of(mask, lp, lr, score, s, torch.full_like(ratio, float("nan")))
    without, _ = rewards_of(mask, lp, lr, score, s)
    assert torch.equal(with_nan, without) and "dpo" not in parts


def slow_placed(values, n, s: SourceSettings, ends) -> list[float]:
    """One row's source reward, scaled, clipped and placed, as the paper's variants describe."""
    per = []
    for h in range(n):
        v = s.scale * float(values[h])
        if s.clip is not None:
            v = max(-s.clip, min(s.clip, v))
        per.append(v)
    placed = [0.0] * n
    if s.granularity == "token":
        placed = list(per)
    elif s.granularity == "sequence":
        placed[n - 1] = sum(per)
    else:
        acc = 0.0
        for h in range(n):
            acc += per[h]
            if ends[h] or h == n - 1:
                placed[h], acc = acc, 0.0
    if s.shaping:
        placed[n - 1] -= sum(per)
    return placed


def slow_general(mask, lp, lr, score, kl_coef, score_coef, sources, sentence, segment_end):
    out = torch.zeros(mask.shape)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        for h in range(n):
            out[b, h] = -kl_coef * (float(lp[b, h]) - float(lr[b, h]))
        for values, s in sources.values():
            for h, v in enumerate(slow_placed(values[b], n, s, segment_end[b])):
                out[b, h] += v
        out[b, n - 1] += score_coef * float(score[b])
        for values, w in sentence.values():
            out[b, n - 1] += w * float(values[b])
    return out


def two_sources(seed: int = 0):
    mask, lp, lr, ratio, score = make_batch(seed)
    g = torch.Generator().manual_seed(seed + 10)
    fn_values = torch.where(mask.bool(), torch.randn(mask.shape, generator=g), torch.nan)
    verifiable = torch.randn(mask.shape[0], generator=g)
    seg = torch.zeros(mask.shape, dtype=torch.bool)
    seg[0, 1] = seg[2, 2] = seg[2, 4] = True
    return mask, lp, lr, ratio, score, fn_values, verifiable, seg


FUNCTION_SETTINGS = [
    SourceSettings(scale=0.5),
    SourceSettings(scale=2.0, clip=0.3, granularity="segment"),
    SourceSettings(scale=1.0, granularity="sequence", shaping=True),
]


@pytest.mark.parametrize("fn_settings", FUNCTION_SETTINGS)
@pytest.mark.parametrize("dpo", ["rto", "semi_rto", "rs_ppo"])
def test_token_sources_and_sentence_rewards_match_slow_loop(fn_settings, dpo) -> None:
    """Each source with its own coefficient, clip, granularity and shaping, plus a sentence
    reward with its weight, summed into one reward."""
    mask, lp, lr, ratio, score, fn_values, verifiable, seg = two_sources()
    s = VARIANTS[dpo]
    sentence = {"reward_fn": (verifiable, 0.7)}
    got, parts = rewards_of(mask, lp, lr, score, s, ratio, segment_end=seg,
                               sources={"function": (fn_values, fn_settings)}, sentence=sentence)  # fmt: skip
    want = slow_general(mask, lp, lr, score, s.kl_coef, s.score_coef,
                        {"dpo": (ratio, s.dpo()), "function": (fn_values, fn_settings)}, sentence, seg)  # fmt: skip
    assert torch.allclose(got, want, atol=1e-5) and torch.isfinite(got).all()
    assert {"dpo", "dpo_per_token", "function", "function_per_token", "reward_fn"} <= set(parts)


def test_sources_add_up_and_a_zero_coefficient_removes_a_source_exactly() -> None:
    mask, lp, lr, ratio, score, fn_values, verifiable, seg = two_sources(1)
    rto, ppo = VARIANTS["rto"], VARIANTS["ppo"]
    fn = SourceSettings(scale=0.5, granularity="segment")

    def rewards(settings, sources=None, sentence=None):
        return rewards_of(mask, lp, lr, score, settings, ratio, segment_end=seg,
                             sources=sources, sentence=sentence)[0]  # fmt: skip

    base = rewards(ppo)
    both = rewards(rto, {"function": (fn_values, fn)}, {"reward_fn": (verifiable, 2.0)})
    alone = [rewards(rto) - base, rewards(ppo, {"function": (fn_values, fn)}) - base,
             rewards(ppo, None, {"reward_fn": (verifiable, 2.0)}) - base]  # fmt: skip
    assert torch.allclose(both, base + sum(alone), atol=1e-6)
    # coefficient 0: bit-identical to the run without the source, whatever its values (NaN here)
    nan = torch.full_like(fn_values, float("nan"))
    off = rewards(ppo, {"function": (nan, SourceSettings(scale=0.0))},
                  {"reward_fn": (torch.full_like(verifiable, float("nan")), 0.0)})  # fmt: skip
    assert torch.equal(off, base)


def test_reward_breakdown_gives_each_sources_sum_and_share() -> None:
    mask, lp, lr, ratio, score, fn_values, verifiable, seg = two_sources(2)
    fn = SourceSettings(scale=0.5, granularity="sequence")
    s = Variant(dpo_reward_scale=0.05, kl_coef=0.1, score_coef=1.0)
    _, parts = rewards_of(mask, lp, lr, score, s, ratio, segment_end=seg,
                             sources={"function": (fn_values, fn)}, sentence={"reward_fn": (verifiable, 2.0)})  # fmt: skip
    got = reward_breakdown(parts, s.kl_coef)
    assert set(got) == {"dpo", "function", "kl", "score", "reward_fn"}
    rows = []  # per component, per response: its rewards (token sources before placing)
    for b, n in enumerate(LENGTHS):
        rows.append({
            "dpo": [0.05 * float(ratio[b, h]) for h in range(n)],
            "function": [0.5 * float(fn_values[b, h]) for h in range(n)],
            "kl": [-0.1 * (float(lp[b, h]) - float(lr[b, h])) for h in range(n)],
            "score": [float(score[b])],
            "reward_fn": [2.0 * float(verifiable[b])],
        })  # fmt: skip
    total = sum(abs(v) for row in rows for vals in row.values() for v in vals)
    for name, (mean_sum, share) in got.items():
        assert mean_sum == pytest.approx(sum(sum(row[name]) for row in rows) / len(rows), abs=1e-5)
        assert share == pytest.approx(
            sum(abs(v) for row in rows for v in row[name]) / total, abs=1e-5
        )
    assert sum(share for _, share in got.values()) == pytest.approx(1.0)


def test_normalize_score() -> None:
    s = normalize_score(torch.tensor([3.0, 100.0, -1.0]), mean=1.0, std=2.0, clamp=10.0,
                        truncated=torch.tensor([False, False, True]), missing_eos_penalty=0.5)  # fmt: skip
    assert s.tolist() == pytest.approx([1.0, 10.0, -1.5])


def test_gae_matches_slow_loop() -> None:
    mask, _, _, _, _ = make_batch()
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(mask.shape, generator=g) * mask
    values = torch.randn(mask.shape, generator=g)  # garbage outside the mask on purpose
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            want = 0.0
            for k in range(t, n):
                v_next = float(values[b, k + 1]) if k + 1 < n else 0.0
                delta = float(rewards[b, k]) + gamma * v_next - float(values[b, k])
                want += (gamma * lam) ** (k - t) * delta
            assert float(adv[b, t]) == pytest.approx(want, abs=1e-5)
            assert float(ret[b, t]) == pytest.approx(want + float(values[b, t]), abs=1e-5)
        assert torch.all(adv[b, n:] == 0)


def test_reinforce_pp_returns_match_slow_loop() -> None:
    mask, _, _, _, _ = make_batch()
    rewards = torch.randn(mask.shape, generator=torch.Generator().manual_seed(4)) * mask
    adv, _ = reward_to_go(rewards, mask, gamma=0.95)
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            want = sum(0.95 ** (k - t) * float(rewards[b, k]) for k in range(t, n))
            assert float(adv[b, t]) == pytest.approx(want, abs=1e-5)


def test_whiten_over_real_tokens() -> None:
    mask, _, _, _, _ = make_batch()
    x = torch.randn(mask.shape) * 5 + 3
    w = whiten(x, mask)
    vals = w[mask.bool()]
    assert float(vals.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(vals.std()) == pytest.approx(1.0, abs=1e-4)
    assert torch.all(w[~mask.bool()] == 0)


def test_clipped_policy_and_value_losses_match_slow_loop() -> None:
    mask, _, _, _, _ = make_batch()
    g = torch.Generator().manual_seed(5)
    logp_old = -torch.rand(mask.shape, generator=g) * 2
    logp = logp_old + torch.randn(mask.shape, generator=g) * 0.5
    adv = torch.randn(mask.shape, generator=g)
    loss, stats = policy_loss(logp, logp_old, adv, mask, clip=0.2)
    terms, clipped_count, kls = [], 0, []
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            ratio = math.exp(float(logp[b, t]) - float(logp_old[b, t]))
            a = float(adv[b, t])
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
            terms.append(max(unclipped, clipped))
            clipped_count += clipped > unclipped
            kls.append((ratio - 1) - math.log(ratio))
    assert float(loss) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert float(stats["clipfrac"]) == pytest.approx(clipped_count / len(terms))
    assert float(stats["approx_kl"]) == pytest.approx(sum(kls) / len(kls), rel=1e-4)

    values_old = torch.randn(mask.shape, generator=g)
    values = values_old + torch.randn(mask.shape, generator=g) * 0.5
    returns = torch.randn(mask.shape, generator=g)
    vloss, _ = value_loss(values, values_old, returns, mask, clip=0.2)
    terms = []
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            v, vo, r = float(values[b, t]), float(values_old[b, t]), float(returns[b, t])
            vc = vo + min(max(v - vo, -0.2), 0.2)
            terms.append(max((v - r) ** 2, (vc - r) ** 2))
    assert float(vloss) == pytest.approx(0.5 * sum(terms) / len(terms), rel=1e-5)


def test_truncated_importance_sampling_matches_slow_loop() -> None:
    """rl.sampler.correction tis: each token's clipped policy term times
    w = min(pi_old / pi_vllm, C), the weight without gradient; C caps it."""
    mask, _, _, _, _ = make_batch()
    g = torch.Generator().manual_seed(9)
    logp_old = -torch.rand(mask.shape, generator=g) * 2
    logp_sampler = logp_old + torch.randn(mask.shape, generator=g) * 0.8  # a sampler that differs
    logp = (logp_old + torch.randn(mask.shape, generator=g) * 0.3).requires_grad_(True)
    adv = torch.randn(mask.shape, generator=g)
    cap = 1.5
    w = sampler_weights(logp_old, logp_sampler, cap)
    loss, _ = policy_loss(logp, logp_old, adv, mask, clip=0.2, weights=w)
    terms, capped = [], 0
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            ratio = math.exp(float(logp[b, t]) - float(logp_old[b, t]))
            weight = min(math.exp(float(logp_old[b, t]) - float(logp_sampler[b, t])), cap)
            capped += weight == cap
            a = float(adv[b, t])
            terms.append(weight * max(-a * ratio, -a * min(max(ratio, 0.8), 1.2)))
    assert float(loss) == pytest.approx(sum(terms) / len(terms), rel=1e-5, abs=1e-7)
    assert 0 < capped < len(terms)  # the cap is met by some tokens, not all
    assert not w.requires_grad
    loss.backward()  # the gradient flows through pi_theta only, scaled by w
    unweighted = logp.detach().clone().requires_grad_(True)
    policy_loss(unweighted, logp_old, adv, mask, clip=0.2)[0].backward()
    assert torch.allclose(logp.grad, unweighted.grad * w, atol=1e-7)
    same, _ = policy_loss(logp, logp_old, adv, mask, 0.2, weights=torch.ones_like(w))
    assert float(same) == float(policy_loss(logp, logp_old, adv, mask, 0.2)[0])  # w = 1: PPO


@pytest.mark.parametrize("task", ["tiny_task", "gpt2_task", "qwen2_task"])
def test_sentence_delimiters_include_newline_tokens(
    request: pytest.FixtureRequest, task: str
) -> None:
    """semi_rto ends a segment at '.', '!', '?' and newlines: newline tokens, which decode to
    whitespace only, are delimiters too."""
    from rto.config.sections import ModelSection
    from rto.data.spans import delimiter_token_ids
    from rto.models.load import load_tokenizer

    tok = load_tokenizer(ModelSection(path=str(request.getfixturevalue(task) / "base_model")))
    ids = set(delimiter_token_ids(tok, [".", "!", "?", "\n"]))
    for text in ("\n", " .", "!", "?"):
        encoded = tok(text, add_special_tokens=False).input_ids
        assert encoded[-1] in ids, text
    for text in (" good", " ", "the"):
        assert tok(text, add_special_tokens=False).input_ids[-1] not in ids, text
