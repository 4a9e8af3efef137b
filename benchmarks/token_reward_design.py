"""The token-reward study's design: its conditions and units, each unit's `rto pipeline` recipe,
the claims and the rules that decide them, and the schedule. The study's script
(token_reward_study.py), its report (token_reward_report.py) and its time estimate
(token_reward_estimate.py) read it; it imports none of them.

The claims and the rules that decide them (CLAIMS below, echoed in the report and the README)
were written down before any run of the study. Per seed, five `rto pipeline` runs ("units"),
each derived from the built-in recipe (src/rto/recipes/sentiment_quick.yaml, its settings
unchanged except the response budget of the longer reviews):

  short    the built-in task: SFT, pairs, reward model, DPO; PPO at every KL coefficient of
           PPO_KL_COEFS (and the length's EXTRA_KL_COEFS) and RTO (at the recipe's); one
           `rto eval` of them all
  medium   the same on reviews of 3-6 sentences (responses of about 37 tokens, not 14)
  long     the same on reviews of 8-12 sentences (about 90 tokens)
  rm_data  in short's folder: reward models on 1/8, 1/4 and 1/2 of short's pairs (all of them is
           short's), each the sentence reward and the critic's start of its own PPO runs and RTO;
           RTO's DPO model is short's, trained on ALL the pairs
  rm_same  the same with RTO's DPO model trained on the same share of the pairs as the reward
           model (the same rows: both stages take the seeded share of the same file), so that
           RTO has no more preference data than PPO. Added after the study had run: in rm_data,
           RTO had up to 8 times PPO's preference data, which confounds its rm_noise claim; the
           claim rm_noise_same_share below is rm_noise read on this unit, its rule unchanged.
           rm_same shares rm_data's reward models and PPO runs (same stages, same fingerprints).
  oracle   in short's folder: PPO and RTO with the gold reward itself as the sentence reward
           (`rto rl --reward_fn sentiment --rl.score.coef 0`, weighted like the reward model's
           normalised score; ORACLE_FN below)
"""

from __future__ import annotations

import copy
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from bench_common import BASE_RECIPE

# Review length -> the response budget of every stage (SFT responses of about 14, 37 and 90
# tokens; the longest SFT responses are about 48, 88 and 162 tokens) and the fluency judge.
LENGTHS = {
    "short": {"max_new_tokens": 48, "max_length": 96, "fluency": "sentiment"},
    "medium": {"max_new_tokens": 96, "max_length": 128, "fluency": "sentiment_medium"},
    "long": {"max_new_tokens": 176, "max_length": 208, "fluency": "sentiment_long"},
}
RM_SHARES = {"f8": 1 / 8, "f4": 1 / 4, "f2": 1 / 2}  # all of the pairs: short's reward model
# PPO's reward-KL frontier in every condition. RTO runs at the recipe's coefficient (0.1); with
# the better-fit DPO model its KL lay above PPO's at 0.1 in every seed of the paper miniature, and
# beyond PPO's at 0.05 in one of three, hence 0.025. 0.2 was added after the first runs of the
# study (before any verdict was read): with the oracle sentence reward (seed 0) and with the
# reward model on 1/8 of the pairs (seed 1) RTO's KL fell below PPO's at 0.1, where the reading
# rule reads nothing. It extends the frontier in every condition alike and adds about a sixth to
# the study's time; the rules and everything else are unchanged.
PPO_KL_COEFS = (0.1, 0.05, 0.025, 0.2)
# Frontier points one condition adds to PPO_KL_COEFS. KL is summed over a response's tokens, so
# it grows with length: on long reviews RTO's KL (6.4, seed 0) lay beyond PPO's at 0.025 (5.4),
# where the reading rule reads nothing. The series continues by halving, in every seed of that
# condition alike (added after that seed's runs, before any long verdict was read; the rules, the
# task and the gold reward unchanged). A point outside the bracket of RTO's KL leaves the reading
# where the frontier already spanned it.
EXTRA_KL_COEFS = {"long": (0.0125,)}
UNITS = ("short", "rm_same", "rm_data", "oracle", "medium", "long")
FOLDER = {
    "short": "short",
    "rm_data": "short",
    "rm_same": "short",
    "oracle": "short",
    "medium": "medium",
    "long": "long",
}
# The oracle's sentence reward: the gold reward through `rto rl --reward_fn sentiment` in place of
# the reward model's score (rl.score.coef 0), weighted by 1 / its sd over the training pairs'
# responses, as the reward model's score is normalised by its sd over the same responses
# (reward_stats.json), so that beta1 and the KL coefficient weigh the same against the sentence
# reward in every condition. (reward_fn is added without centring: the gold reward's mean over
# those responses, a tenth of its sd or so, stays in; whitened advantages and the critic absorb a
# constant.) The reward model still starts the critic (rl.critic_init reward_model, kept when
# score_coef is 0), as in every other run, so that the sentence reward is the only difference.
# The report refuses an oracle verdict unless the logged rewards show the gold reward, and no
# reward-model score, as the sentence reward (token_reward_report.oracle_check).
ORACLE_FN = "sentiment"


def oracle_weight(folder: Path) -> float:
    """1 / sd of the gold reward over the responses of short's training pairs (chosen and
    rejected, as `rto rm` computes its stored statistics), to 4 significant digits."""
    pairs = folder / "pairs" / "pairs_train.jsonl"
    if not pairs.is_file():
        raise SystemExit(
            f"the oracle unit weighs the gold reward by its spread over short's pairs, and {pairs} "
            "does not exist: run the short unit first (--units short oracle)"
        )
    rows = [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()]
    gold = [r[k] for r in rows for k in ("chosen_gold", "rejected_gold")]
    return float(f"{1 / statistics.pstdev(gold):.4g}")


def oracle_spec(folder: Path) -> dict:
    """What the oracle's RL runs change: the sentence reward."""
    return {"reward_fn": ORACLE_FN,
            "rl": {"score": {"coef": 0.0}, "reward_fn": {"coef": oracle_weight(folder)}}}  # fmt: skip


# Condition point -> (unit whose eval holds its runs, tag in their names)
POINTS = {
    "short": ("short", ""),
    "medium": ("medium", ""),
    "long": ("long", ""),
    "rm_1/8": ("rm_data", "f8"),
    "rm_1/4": ("rm_data", "f4"),
    "rm_1/2": ("rm_data", "f2"),
    "rm_same_1/8": ("rm_same", "f8"),
    "rm_same_1/4": ("rm_same", "f4"),
    "rm_same_1/2": ("rm_same", "f2"),
    "oracle": ("oracle", "oracle"),
}
# share of the pairs -> condition, per arm: the DPO model on all pairs (rm_data) or on the reward
# model's share (rm_same); all of the pairs is short's in both
RM_POINTS = {"rm_1/8": 1 / 8, "rm_1/4": 1 / 4, "rm_1/2": 1 / 2, "short": 1.0}
RM_SAME_POINTS = {"rm_same_1/8": 1 / 8, "rm_same_1/4": 1 / 4, "rm_same_1/2": 1 / 2, "short": 1.0}

CLAIMS = [
    {
        "id": "length",
        "claim": "RTO's advantage over PPO grows with response length.",
        "measure": "In each seed and review length: RTO's held-out gold reward minus PPO's "
        "reward-KL frontier (PPO at every KL coefficient, same length) read at RTO's KL; per "
        "seed, the least-squares slope of that difference against log2 of the SFT policy's mean "
        "response length (gold reward per doubling of length).",
        "rule": "yes: the mean slope over seeds is positive by more than two standard errors; "
        "weak: positive within that noise; no: zero or negative. No difference is read where "
        "RTO's KL lies outside PPO's frontier; a seed counts where two or more lengths are read; "
        "cannot tell with fewer than two counting seeds.",
    },
    {
        "id": "rm_noise",
        "claim": "The DPO token reward helps more when the sentence reward is noisier.",
        "measure": "In each seed and share of the pairs (1/8, 1/4, 1/2, all) that the reward model "
        "(PPO's and RTO's sentence reward and critic start) is trained on: RTO minus PPO's "
        "frontier at RTO's KL, as above; per seed, the slope of that difference against log2 of "
        "the share.",
        "rule": "yes: the mean slope is negative by more than two standard errors (the advantage "
        "shrinks as the reward model gets more data); weak: negative within that noise; no: zero "
        "or positive. Reading rules as above.",
    },
    {
        "id": "rm_noise_same_share",
        "claim": "The DPO token reward helps more when the sentence reward is noisier, with RTO "
        "given no more preference data than PPO.",
        "measure": "As rm_noise, with RTO's DPO model trained on the same share of the pairs as the "
        "reward model (unit rm_same; added after the study, because in rm_data the DPO model saw "
        "all the pairs).",
        "rule": "As rm_noise.",
    },
    {
        "id": "oracle_credit",
        "claim": "With the gold reward itself as the sentence reward, RTO still beats PPO at "
        "equal KL: the token reward helps by spreading credit over the tokens, not only as a "
        "second judge.",
        "measure": "Per seed: RTO minus PPO's frontier at RTO's KL, both with the gold reward as "
        "the sentence reward (and the reward model, as everywhere, as the critic's start); beside "
        "it, RTO's fluency rate minus that of PPO's frontier at RTO's KL.",
        "rule": "yes: the mean over seeds is positive by more than two standard errors; weak: "
        "positive within that noise; no: zero or negative; cannot tell with fewer than two seeds "
        "read. Here the judge is also the training reward, so a gain could be bought with "
        "malformed text that VADER likes: where RTO's mean fluency is more than 0.05 below the "
        "frontier's, a yes is read as weak. No oracle verdict unless the logged rewards show the "
        "gold reward alone as the sentence reward.",
    },
    {
        "id": "oracle_judge",
        "claim": "Part of RTO's advantage with a learned reward model is a second judge: the "
        "advantage is smaller with the oracle sentence reward.",
        "measure": "Per seed: (RTO minus PPO's frontier, reward model on all pairs) minus (RTO "
        "minus PPO's frontier, oracle sentence reward).",
        "rule": "As for the oracle claim above, on this paired difference.",
    },
    {
        "id": "efficiency",
        "claim": "RTO reaches PPO's final gold reward with about 1/8 of PPO's RL samples (the "
        "paper's data-scaling result).",
        "measure": "In each condition and seed: the gold reward of the RL rollouts against "
        "samples (trailing mean over a tenth of the iterations), PPO and RTO at the recipe's KL "
        "coefficient; the share of PPO's samples after which RTO's curve first reaches PPO's "
        "final value.",
        "rule": "In a condition: yes when RTO reaches it in every seed and the mean share is at "
        "most 1/4 (generous to the paper's 1/8), else no. Overall: yes in every condition: yes; "
        "in none: no; otherwise partly, naming the conditions.",
    },
]


@dataclass(frozen=True)
class Size:
    """How big each part is: the study's (FULL) or the smoke test's (SMOKE)."""

    kl_coefs: tuple[float, ...] = PPO_KL_COEFS
    extra_kl_coefs: dict = field(default_factory=lambda: dict(EXTRA_KL_COEFS))  # unit -> coefs
    task: dict = field(default_factory=dict)  # extra `rto task sentiment` options
    train: dict = field(default_factory=dict)  # stage kind -> train overrides
    rl: dict = field(default_factory=dict)  # rl section overrides
    eval_prompts: int | None = None  # held-out prompts of every sampled evaluation

    def coefs(self, unit: str) -> tuple[float, ...]:
        """PPO's KL coefficients in a unit's frontier: every unit's, then the unit's own."""
        return self.kl_coefs + self.extra_kl_coefs.get(unit, ())


FULL = Size()
SMOKE = Size(
    kl_coefs=(0.1, 0.02),
    extra_kl_coefs={"long": (0.01,)},
    task={"num_sft": 400, "num_sft_eval": 40, "num_train_prompts": 320, "num_eval_prompts": 32,
          "hidden_size": 32, "num_layers": 1, "num_heads": 2},
    train={"sft": {"max_steps": 200}, "rm": {"max_steps": 4, "batch_size": 8, "micro_batch_size": 8},
           "dpo": {"max_steps": 4, "batch_size": 8, "micro_batch_size": 8},
           "rl": {"max_steps": 6, "batch_size": 16, "micro_batch_size": 16, "lr": 2.0e-3}},
    rl={"rollout_batch_size": 16},
    eval_prompts=32,
)  # fmt: skip


def coef_tag(coef: float) -> str:
    return str(coef).replace(".", "p")  # stage names take no dots


def _sfx(tag: str) -> str:
    return f"_{tag}" if tag else ""


def ppo_stage(tag: str, coef: float) -> str:
    return f"rl_ppo{_sfx(tag)}_kl_{coef_tag(coef)}"


def rto_stage(tag: str, unit: str = "") -> str:
    """RTO's stage; in rm_same its DPO model is the share's own: rl_rto_f8_dpo_f8."""
    return f"rl_rto{_sfx(tag)}" + (f"_dpo_{tag}" if unit == "rm_same" else "")


def ppo_policy(tag: str, coef: float) -> str:
    return f"ppo{_sfx(tag)}_kl{coef}"


def rto_policy(tag: str) -> str:
    return f"rto{_sfx(tag)}"


def recipe_kl_coef() -> float:
    return yaml.safe_load(BASE_RECIPE.read_text())["defaults"]["rl"]["rl"]["kl"]["coef"]


# --------------------------------------------------------------------------- the plan


def recipe_for(unit: str, seed: int, out: Path, size: Size = FULL) -> dict:
    """The `rto pipeline` recipe of one unit of one seed, writing into `out` (its folder)."""
    base = yaml.safe_load(BASE_RECIPE.read_text())
    length = unit if unit in LENGTHS else "short"
    budget = LENGTHS[length]
    stages = base["stages"]
    defaults = copy.deepcopy(base["defaults"])
    for kind in ("sft", "rm", "dpo"):
        defaults[kind]["data"]["max_length"] = budget["max_length"]
    rl = defaults["rl"]
    rl["generate"]["max_new_tokens"] = budget["max_new_tokens"]
    rl["train"]["eval_every"] = 0  # the rollouts give the curves, the eval stage the results
    rl["train"].update(size.train.get("rl", {}))
    rl["rl"].update(size.rl)
    rl["eval"].pop("prompts", None)
    rl["eval"]["fluency"] = budget["fluency"]

    def sampled(stage: dict) -> dict:  # a stage that samples responses, at this length
        stage = copy.deepcopy(stage)
        stage["generate"]["max_new_tokens"] = budget["max_new_tokens"]
        if "eval" in stage:
            stage["eval"]["fluency"] = budget["fluency"]
            if size.eval_prompts:
                stage["eval"]["num_prompts"] = size.eval_prompts
        return stage

    new: dict = {"task": {**stages["task"], "seed": 0, "review_length": length, **size.task}}
    for name in ("sft", "pairs", "rm", "dpo"):
        new[name] = (
            sampled(stages[name]) if name in ("sft", "pairs") else copy.deepcopy(stages[name])
        )
        if name in size.train:
            new[name]["train"] = {**new[name]["train"], **size.train[name]}
    policies = ["sft={sft}"]
    if unit in LENGTHS:
        policies.append("dpo={dpo}")
        runs = rl_runs("", "{rm}", size, coefs=size.coefs(unit))
    elif unit in ("rm_data", "rm_same"):
        runs = {}
        for tag, share in RM_SHARES.items():
            new[f"rm_{tag}"] = copy.deepcopy(new["rm"])
            new[f"rm_{tag}"]["data"]["train_fraction"] = share
            dpo_model = None
            if unit == "rm_same":  # the DPO model on the reward model's rows
                new[f"dpo_{tag}"] = copy.deepcopy(new["dpo"])
                new[f"dpo_{tag}"]["data"]["train_fraction"] = share
                dpo_model = f"{{dpo_{tag}}}"
            runs.update(rl_runs(tag, f"{{rm_{tag}}}", size, dpo_model=dpo_model, unit=unit))
    elif unit == "oracle":
        runs = rl_runs("oracle", "{rm}", size, oracle_spec(out))
    else:
        raise ValueError(f"unknown unit {unit!r}; units: {', '.join(UNITS)}")
    new.update({stage: spec for stage, (_, spec) in runs.items()})
    policies += [f"{policy}={{{stage}}}" for stage, (policy, _) in runs.items()]
    new[f"eval_{unit}"] = {**sampled(stages["eval"]), "policies": policies}
    return {"description": f"token-reward study: {unit}, seed {seed}", "out": str(out),
            "seed": seed, "defaults": defaults, "stages": new}  # fmt: skip


def rl_runs(
    tag: str,
    reward_model: str,
    size: Size,
    extra: dict | None = None,
    coefs: tuple[float, ...] | None = None,
    dpo_model: str | None = None,
    unit: str = "",
) -> dict:
    """stage name -> (policy name, stage spec): PPO at every KL coefficient (coefs, by default
    the size's), RTO at the recipe's (with `dpo_model` in place of the recipe's, when given)."""
    extra = extra or {}
    coefs = size.kl_coefs if coefs is None else coefs

    def spec(preset: str, rl: dict) -> dict:
        return {"stage": "rl", "preset": preset, "reward_model": reward_model,
                **{k: v for k, v in extra.items() if k != "rl"}, "rl": {**rl, **extra.get("rl", {})}}  # fmt: skip

    runs = {
        ppo_stage(tag, c): (ppo_policy(tag, c), spec("ppo", {"kl": {"coef": c}})) for c in coefs
    }
    rto = spec("rto", {})
    if dpo_model:
        rto["dpo_model"] = dpo_model
    runs[rto_stage(tag, unit)] = (rto_policy(tag), rto)
    return runs


def unit_folder(runs: Path, seed: int, unit: str) -> Path:
    return runs / f"seed{seed}" / FOLDER[unit]


def jobs(seeds: list[int], units: list[str]) -> list[list[tuple[int, str]]]:
    """Chains of (seed, unit) that run one after another (units sharing a folder); the costliest
    chains first, so that the last one to start is short (long, then short's, then medium)."""
    chains = []
    for folder in ("long", "short", "medium"):
        for seed in seeds:
            chain = [(seed, u) for u in units if FOLDER[u] == folder]
            if chain:
                chains.append(chain)
    return chains
