"""The RL algorithm's options (`rl.*` of `rto rl`), grouped by what they configure:

    rl.*                  the rollout and the estimator: PPO (GAE with a critic), REINFORCE++,
                          or a group estimator over each prompt's responses; the PPO update
    rl.kl.*               the KL to the reference (beta2): in every token's reward, or in the loss
    rl.score.*            the reward model's score on the last token (beta3)
    rl.reward_fn.*        the sentence reward function (top-level key reward_fn)
    rl.dpo_reward.*       the DPO token-reward source: beta1 * log(pi_dpo / pi_ref) per token
    rl.token_reward_fn.*  the user's token-reward function (top-level key token_reward_fn)
    rl.online_dpo.*       the DPO model learning online (PRIME's implicit-PRM update)
    rl.sampler.*          correcting for a sampler other than the policy (vLLM)

The two token-reward sources share one set of knobs (`TokenSourceSection`: scale, clip,
granularity, shaping). The presets (`rto rl --preset`) are built from the same parts.
"""

from __future__ import annotations

from dataclasses import dataclass

from rto.config.core import option, section

GRANULARITIES = ["token", "segment", "sequence"]


def _source(what: str, symbol: str, default_scale: float, paper: str | None) -> type:
    """The knobs of a token-reward source whose values are `what`, scaled by `symbol`."""

    @dataclass
    class TokenSourceSection:
        scale: float = option(default_scale, f"{symbol}: coefficient of {what} (0 switches the source off).",
                              min=0.0, paper=paper)  # fmt: skip
        clip: float | None = option(
            None, "Clamp each scaled token reward to +-this (null = no clamp; the RTO authors' code "
            "clamps the DPO reward at 0.05).", min=0.0, min_exclusive=True,
        )  # fmt: skip
        granularity: str = option(
            "token", "Where the rewards land: token (each on its own token: rto), segment (summed onto "
            "each sentence's last token: semi_rto), sequence (summed onto the last token: ddpo).",
            choices=GRANULARITIES,
        )  # fmt: skip
        shaping: bool = option(
            False, "Subtract the summed token reward at the last token, so that the source only shapes "
            "the return (rs_ppo: the total return is the sentence reward's).",
        )  # fmt: skip

    return TokenSourceSection


DPORewardSection = _source(
    "the DPO token reward log pi_dpo(y_h|x,y_<h) - log pi_ref(y_h|x,y_<h) (dpo_model); 0 = standard "
    "PPO, exactly", "beta1", 0.05, "beta1 0.05",
)  # fmt: skip
FunctionRewardSection = _source(
    "the token reward function's values (token_reward_fn)", "scale", 1.0, None
)


@dataclass
class KLSection:
    coef: float = option(0.01, "beta2: weight of the KL penalty to the reference.", min=0.0,
                         paper="beta2 0.01")  # fmt: skip
    target: float | None = option(
        None, "Adapt kl.coef towards this per-response KL (null = a fixed coefficient).", min=0.0,
        min_exclusive=True,
    )  # fmt: skip
    horizon: int = option(10000, "Horizon (responses) of the adaptive KL controller.", min=1)
    in_loss: bool = option(
        False, "Put the KL in the policy loss as GRPO's k3 estimator (exp(l) - l - 1, l = log pi_ref - "
        "log pi_theta, token mean), weighted by kl.coef, instead of -kl.coef x log-ratio in every "
        "token's reward (RTO).", paper="beta2 in the loss (DeepSeekMath eq. 4)",
    )  # fmt: skip


@dataclass
class ScoreSection:
    coef: float = option(1.0, "beta3: weight of the reward model's score on the last token.",
                         min=0.0, paper="beta3 1")  # fmt: skip
    normalization: str = option(
        "stored", "Normalise the score with the reward model's stored mean/std (reward_stats.json), a "
        "running estimate, or not at all.", choices=["stored", "running", "none"],
    )  # fmt: skip
    clamp: float | None = option(
        10.0, "Clamp the normalised score to +-this (null = off).", min=0.0, min_exclusive=True
    )
    missing_eos_penalty: float | None = option(
        None, "Subtract this from the normalised score of responses that end without EOS.", min=0.0
    )


@dataclass
class RewardFnSection:
    coef: float = option(
        1.0, "Weight of the sentence reward function (reward_fn) on the last token, added "
        "unnormalised.", min=0.0,
    )  # fmt: skip


@dataclass
class OnlineDPOSection:
    enabled: bool = option(
        False, "Keep training the DPO model on every rollout with PRIME's cross-entropy loss "
        "-[y log sigmoid(beta1 sum_t x_t) + (1-y) log(1 - sigmoid(...))] (x_t its log-ratio to the "
        "reference, y the label of online_dpo.label), as a second optimised model: its own AdamW, "
        "the schedule, clipping and skipped-step counts; saved to OUT/token_reward_model. Off: the "
        "DPO model stays as trained (RTO).", paper="PRIME implicit PRM update (arXiv 2502.01456)",
    )  # fmt: skip
    lr: float = option(
        1e-6, "Peak learning rate of the DPO model's updates (0 = computed but no change).",
        min=0.0, paper="PRIME PRM lr 1e-6",
    )  # fmt: skip
    steps: int = option(
        1,
        "Optimiser steps of the DPO model per rollout, each on the whole rollout.",
        min=1,
        max=100,
    )
    order: str = option(
        "after", "The DPO model learns after it scores a rollout (PRIME's single forward: the rewards "
        "are the model's before it saw them) or before (the rewards come from the updated model; one "
        "more forward).", choices=["after", "before"],
    )  # fmt: skip
    label: str = option(
        "group_mean", "The label y of a response: group_mean = 1 when its sentence reward (score.coef x "
        "the raw score + reward_fn.coef x reward_fn) is above its group's mean, else 0 (groups of equal "
        "rewards are left out; for unbounded reward-model scores; needs rl.samples_per_prompt >= 2); "
        "value = the sentence reward as it is, which must lie in [0, 1] (a verifiable reward_fn).",
        choices=["group_mean", "value"],
    )  # fmt: skip


@dataclass
class SamplerSection:
    correction: str = option(
        "none", "With generate.backend vllm, the engine's sampling log-probs pi_vllm are kept beside the "
        "trainer's pi_old and their gap logged (rollout/sampler_gap_*); tis weighs each token's policy "
        "loss by min(pi_old / pi_vllm, sampler.tis_cap) (truncated importance sampling), none leaves it "
        "as it is.", choices=["none", "tis"],
        paper="truncated importance sampling (Yao et al. 2025; TRL, veRL)",
    )  # fmt: skip
    tis_cap: float = option(
        2.0, "correction tis: the cap C of the per-token weight min(pi_old / pi_vllm, C).", min=1.0
    )


@dataclass
class RLSection:
    rollout_batch_size: int = option(
        1024, "Prompts (not responses) per rollout (per iteration), across all devices; the rollout "
        "holds this x rl.samples_per_prompt responses.", min=1, paper="rollout batch 1024",
    )  # fmt: skip
    samples_per_prompt: int = option(
        1, "Responses sampled per prompt (K), each with its own seed: a group, kept together on one "
        "process through scoring, rewards and the group estimators.", min=1,
        paper="one sample per prompt",
    )  # fmt: skip
    advantage_estimator: str = option(
        "gae", "gae (critic), reinforce_pp (critic-free, REINFORCE++), or a critic-free group estimator "
        "over each prompt's rl.samples_per_prompt responses (>= 2): rloo (PRIME's leave-one-out on the "
        "sentence and, apart, the dense reward), grpo (group-normalised, DeepSeekMath process "
        "supervision), reinforce_pp_baseline (REINFORCE++ with the group's mean score as baseline).",
        choices=["gae", "reinforce_pp", "rloo", "grpo", "reinforce_pp_baseline"],
    )  # fmt: skip
    group_std_normalization: bool = option(
        True, "grpo: divide by the group's standard deviation (GRPO); false = Dr. GRPO, subtract the "
        "group mean only.", paper="GRPO std (DeepSeekMath 4.1.2-4.1.3)",
    )  # fmt: skip
    gamma: float = option(1.0, "Discount.", min=0.0, max=1.0, paper="gamma 1")
    gae_lambda: float = option(0.95, "GAE lambda.", min=0.0, max=1.0, paper="lambda 0.95")
    whiten_advantages: bool = option(True, "Normalise advantages over the rollout batch.")
    critic_init: str = option(
        "reward_model", "Initialise the critic from the reward model (paper) or the policy (new head); "
        "a reward model with another tokenizer than the policy's, or none, leaves the policy (with a "
        "note).", choices=["reward_model", "policy"],
    )  # fmt: skip
    critic_lr: float = option(
        9e-6, "Critic learning rate.", min=0.0, min_exclusive=True, paper="critic lr 9e-6"
    )
    ppo_epochs: int = option(
        1, "Passes over each rollout; each pass makes rollout/train.batch_size updates.", min=1
    )
    clip_range: float = option(
        0.2, "PPO ratio clip epsilon.", min=0.0, min_exclusive=True, paper="clip 0.2"
    )
    value_clip: float | None = option(
        0.2, "Value clip (null = off).", min=0.0, min_exclusive=True, paper="value clip 0.2"
    )
    entropy_coef: float = option(0.0, "Entropy bonus weight.", min=0.0)
    forward_batch_size: int = option(
        16, "Sequences per forward pass when scoring a rollout.", min=1
    )
    segment_delimiters: list[str] = option(
        [".", "!", "?", "\n"], "Tokens ending with one of these end a segment (a token-reward "
        "source's granularity segment).",
    )  # fmt: skip
    kl: KLSection = section(KLSection, "The KL penalty to the reference (beta2).")
    score: ScoreSection = section(
        ScoreSection, "The reward model's score on the last token (beta3)."
    )
    reward_fn: RewardFnSection = section(
        RewardFnSection, "The sentence reward function (reward_fn)."
    )
    dpo_reward: DPORewardSection = section(  # type: ignore[valid-type]
        DPORewardSection, "The DPO token reward (dpo_model): RTO's dense reward (beta1)."
    )
    token_reward_fn: FunctionRewardSection = section(  # type: ignore[valid-type]
        FunctionRewardSection, "The token reward function's rewards (token_reward_fn)."
    )
    online_dpo: OnlineDPOSection = section(
        OnlineDPOSection, "The DPO model learning online (the online token-reward model)."
    )
    sampler: SamplerSection = section(SamplerSection, "A sampler other than the policy (vLLM).")

    # Keys an earlier version of rto had: a config or command line that uses one is refused with
    # the key to use instead (old key -> (new key, how a value carries over)), relative to rl.
    RENAMED = {
        **{f"dpo_reward_{k}": (f"dpo_reward.{k}", "") for k in ("scale", "clip", "granularity", "shaping")},
        **{f"token_reward_fn_{k}": (f"token_reward_fn.{k}", "") for k in ("scale", "clip", "granularity", "shaping")},
        **{f"kl_{k}": (f"kl.{k}", "") for k in ("coef", "target", "horizon", "in_loss")},
        **{f"score_{k}": (f"score.{k}", "") for k in ("coef", "normalization", "clamp")},
        "missing_eos_penalty": ("score.missing_eos_penalty", ""),
        "reward_fn_coef": ("reward_fn.coef", ""),
        "token_reward_update": ("online_dpo.enabled", "true for online, false for frozen"),
        "token_reward_lr": ("online_dpo.lr", ""),
        "token_reward_steps": ("online_dpo.steps", ""),
        "token_reward_update_order": ("online_dpo.order", ""),
        "token_reward_label": ("online_dpo.label", ""),
        "sampler_correction": ("sampler.correction", ""),
        "tis_cap": ("sampler.tis_cap", ""),
    }  # fmt: skip


# Presets: the paper's methods and the group estimators, each a combination of these parts.
_NO_DPO: dict[str, object] = {"rl.dpo_reward.scale": 0.0}
_DPO_TOKENS: dict[str, object] = {"rl.dpo_reward.scale": 0.05, "rl.dpo_reward.granularity": "token",
                                  "rl.dpo_reward.shaping": False}  # fmt: skip
_GAE: dict[str, object] = {"rl.advantage_estimator": "gae"}
_RPP: dict[str, object] = {"rl.advantage_estimator": "reinforce_pp"}
# critic-free group estimators (K = 4 responses per prompt, as PRIME); GRPO keeps the KL in its
# loss and its advantages unwhitened, RLOO in the reward
_GROUP: dict[str, object] = {"rl.samples_per_prompt": 4}
_GRPO: dict[str, object] = {**_GROUP, "rl.advantage_estimator": "grpo", "rl.kl.in_loss": True,
                            "rl.whiten_advantages": False}  # fmt: skip
_RLOO: dict[str, object] = {**_GROUP, "rl.advantage_estimator": "rloo"}

PRESETS: dict[str, dict[str, object]] = {
    "ppo": {**_NO_DPO, **_GAE},
    "rto": {**_DPO_TOKENS, **_GAE},
    "rs_ppo": {**_DPO_TOKENS, "rl.dpo_reward.shaping": True, **_GAE},
    "semi_rto": {**_DPO_TOKENS, "rl.dpo_reward.granularity": "segment", **_GAE},
    "ddpo": {**_DPO_TOKENS, "rl.dpo_reward.granularity": "sequence", **_GAE},
    "rpp": {**_NO_DPO, **_RPP},
    "rto_rpp": {**_DPO_TOKENS, **_RPP},
    "grpo": {**_NO_DPO, **_GRPO},
    "rto_grpo": {**_DPO_TOKENS, **_GRPO},
    "rloo": {**_NO_DPO, **_RLOO},
    "rto_rloo": {**_DPO_TOKENS, **_RLOO},
}
