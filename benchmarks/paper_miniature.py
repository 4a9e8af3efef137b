"""The RTO paper's experiments in miniature, on the built-in sentiment task, over several seeds.

    python benchmarks/paper_miniature.py --workers 3        # 3 seeds (about 1 h on 2 cores)
    python benchmarks/paper_miniature.py --seeds 0 --workers 1   # one seed
    python benchmarks/paper_miniature.py --report-only      # re-aggregate finished runs

Per seed, one `rto pipeline` run (so finished stages are kept and an interrupted benchmark
resumes where it stopped) with:
  * Table 1: SFT, DPO, R-DPO, SimPO, TDPO, PPO, RTO
  * ablations: Semi-RTO, DDPO, RS-PPO; the critic-free pair RPP vs RTO-RPP
  * data scaling: PPO and RTO with 1/8, 1/4, 1/2 and all of the RL budget
  * a beta1 sweep (the paper has none)
  * PPO at smaller KL coefficients, so that RTO can be compared with PPO at equal KL to SFT
  * RTO with a DPO model fit further from the gold ceiling (the earlier recipe's DPO learning
    rate, a fifth of today's)
  * one `rto eval` of every policy on the same held-out prompts
The task itself (data and base model) is the same for every seed; the seed changes everything
trained on it. Each pipeline runs in its own process with one thread, so reruns reproduce the
numbers exactly on the same machine type.

Outputs: benchmarks/results/paper_miniature.{json,md} and plots beside them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from bench_common import (
    BASE_RECIPE,
    VERDICT_TEXT,
    above_ppo_frontier,
    efficiency,
    made_on,
    mean_sd,
    minutes_text,
    replace_marked,
    run_pipeline,
    stage_minutes,
    verdict,
    weakest,
)

ROOT = Path(__file__).resolve().parent
BUDGETS = {"b8": 8, "b4": 4, "b2": 2}
BETAS = [0.01, 0.02, 0.1, 0.2]
# The recipe's kl_coef is 0.1; smaller ones let PPO drift as far as RTO. 0.025 was added after the
# rerun with today's recipes was first read: RTO's KL (2.66) lay beyond PPO's at 0.05 (2.52) in
# seed 2, where the equal-KL reading reads nothing. It extends the frontier in every seed alike;
# the rule is unchanged (the token-reward study's frontier has had 0.025 from its start).
PPO_KL_COEFS = [0.05, 0.07, 0.025]
RL_METHODS = ["ppo", "rto", "semi_rto", "ddpo", "rs_ppo", "rpp", "rto_rpp"]
DIRECT = {"dpo": {}, "rdpo": {"loss": "rdpo"}, "simpo": {"loss": "simpo"}, "tdpo": {"loss": "tdpo"}}
TABLE1 = ["sft", "dpo", "rdpo", "simpo", "tdpo", "ppo", "rto"]
ABLATIONS = ["rto", "semi_rto", "ddpo", "rs_ppo", "rpp", "rto_rpp"]
# DPO's learning rate in the recipe was 2e-4, which leaves the DPO model's held-out accuracy
# 0.12-0.15 under the gold reward's; 1e-3 closes about 40% of that gap and gave RTO a better token
# reward in every seed (README, "DPO settings"), so the recipe now uses 1e-3. The comparison stays:
# RTO with a DPO model trained at the earlier rate. Runs made before the change have the opposite
# layout (the recipe's `dpo` at 2e-4 beside a `dpo_fit` at 1e-3); the report reads either.
DPO_EARLIER_LR = 2.0e-4
DPO_EARLIER = "dpo_lr2e-4"  # stage and policy name of that DPO model (RTO with it: rto_dpo_lr2e-4)


def beta_stage(beta: float) -> str:
    return "rl_rto_beta_" + str(beta).replace(".", "p")  # stage names take no dots


def kl_stage(coef: float) -> str:
    return "rl_ppo_kl_" + str(coef).replace(".", "p")


def policy_name(stage: str) -> str:
    """rl_rto_beta_0p01 -> rto_beta0.01, rl_ppo_kl_0p05 -> ppo_kl0.05, rl_ppo_b8 -> ppo_b8."""
    return re.sub(r"_(\d+)p(\d+)$", r"\1.\2", stage[len("rl_") :])


def recipe_for(seed: int, out: Path) -> dict:
    base = yaml.safe_load(BASE_RECIPE.read_text())
    stages = base["stages"]
    steps = base["defaults"]["rl"]["train"]["max_steps"]
    new: dict = {"task": {**stages["task"], "seed": 0}}
    for name in ("sft", "pairs", "rm"):
        new[name] = stages[name]
    for name, extra in DIRECT.items():
        new[name] = {**copy.deepcopy(stages["dpo"]), **extra}
    new[DPO_EARLIER] = copy.deepcopy(stages["dpo"])
    new[DPO_EARLIER]["train"]["lr"] = DPO_EARLIER_LR
    rl_defaults = copy.deepcopy(base["defaults"]["rl"])
    rl_defaults["train"]["eval_every"] = (
        0  # the eval stage scores every policy; rollouts give the curves
    )
    rl_defaults["eval"].pop("prompts", None)
    for method in RL_METHODS:
        new[f"rl_{method}"] = {"stage": "rl", "preset": method}
    for method in ("ppo", "rto"):
        for tag, frac in BUDGETS.items():
            new[f"rl_{method}_{tag}"] = {
                "stage": "rl",
                "preset": method,
                "train": {"max_steps": max(1, steps // frac)},
            }
    for beta in BETAS:
        new[beta_stage(beta)] = {
            "stage": "rl",
            "preset": "rto",
            "rl": {"dpo_reward": {"scale": beta}},
        }
    for coef in PPO_KL_COEFS:
        new[kl_stage(coef)] = {"stage": "rl", "preset": "ppo", "rl": {"kl": {"coef": coef}}}
    new[f"rl_rto_{DPO_EARLIER}"] = {"stage": "rl", "preset": "rto",
                                   "dpo_model": f"{{{DPO_EARLIER}}}"}  # fmt: skip
    policies = ["sft={sft}"] + [f"{n}={{{n}}}" for n in [*DIRECT, DPO_EARLIER]]
    policies += [f"{policy_name(n)}={{{n}}}" for n in new if n.startswith("rl_")]
    new["eval"] = {**copy.deepcopy(stages["eval"]), "policies": policies}
    base.update(
        {
            "out": str(out),
            "seed": seed,
            "stages": new,
            "description": f"paper miniature, seed {seed}",
        }
    )
    base["defaults"]["rl"] = rl_defaults
    return base


def run_seed(seed: int, runs: Path) -> tuple[int, float]:
    out = runs / f"seed{seed}"
    return run_pipeline(recipe_for(seed, out), out / "recipe.yaml", out / "log.txt")


# --------------------------------------------------------------------------- aggregation


def ppo_names() -> list[str]:
    """Every PPO run of a seed: the budgets and the KL-coefficient sweep."""
    return ["ppo", *[f"ppo_{t}" for t in BUDGETS], *[f"ppo_kl{c}" for c in PPO_KL_COEFS]]


def finished_seeds(runs: Path, seeds: list[int]) -> dict[int, dict]:
    """seed -> its evaluation's per-method results, for the seeds whose evaluation has finished."""
    files = {s: runs / f"seed{s}" / "eval" / "eval.json" for s in seeds}
    return {s: json.loads(f.read_text())["methods"] for s, f in files.items() if f.is_file()}


def saved_aggregate(saved: Path) -> dict:
    """The aggregate a results JSON was written from (its runs gone): the claims are judged again
    by today's rules. Runs made before the learning rates were recorded had the earlier layout,
    whose rates are known (`dpo` at DPO_EARLIER_LR, `dpo_fit` at the recipe's 1e-3 of today)."""
    res = json.loads(saved.read_text())
    for key in ("claims", "minutes_this_invocation"):
        res.pop(key, None)
    if "dpo_fit" in res["methods"] and not res.get("dpo_learning_rates"):
        res["dpo_learning_rates"] = {"dpo": DPO_EARLIER_LR, "dpo_fit": 1e-3}
    return res


def aggregate(runs: Path, seeds: list[int]) -> dict:
    per_seed = finished_seeds(runs, seeds)
    if not per_seed:
        raise SystemExit(f"no finished seeds under {runs}")
    names = list(next(iter(per_seed.values())))
    metrics = (
        "gold_reward_mean",
        "kl_mean",
        "fluency_rate",
        "length_mean",
        "win_rate_vs_sft",
        "rm_score_mean",
    )
    methods = {
        n: {m: mean_sd([per_seed[s][n].get(m) for s in per_seed]) for m in metrics} for n in names
    }
    eff = []
    for res in per_seed.values():
        target = res["ppo"]["gold_reward_mean"]
        curve = {1 / frac: res[f"rto_{tag}"]["gold_reward_mean"] for tag, frac in BUDGETS.items()}
        curve[1.0] = res["rto"]["gold_reward_mean"]
        eff.append(efficiency(curve, target))
    rto_runs = ["rto", *[f"rto_{d}" for d in ("dpo_fit", DPO_EARLIER) if f"rto_{d}" in names]]
    ppo = ppo_names()  # PPO's frontier: every PPO run of the seed
    return {"seeds": list(per_seed), "methods": methods, "sample_efficiency_rto_vs_ppo": eff,
            **{f"{n}_minus_ppo_at_equal_kl": [above_ppo_frontier(r, n, ppo) for r in per_seed.values()]
               for n in rto_runs},
            "dpo_learning_rates": dpo_learning_rates(runs, list(per_seed)),
            "heldout_accuracy": heldout_accuracy(runs, list(per_seed)),
            "environment": run_environment(runs, list(per_seed)),
            "minutes": stage_minutes([runs / f"seed{s}" for s in per_seed],
                                     list(recipe_for(0, runs)["stages"]))}  # fmt: skip


def dpo_fit_comparison(methods: dict) -> dict | None:
    """Which RTO run had the better-fit DPO model and which the less-fit one, in either layout:
    today's (recipe `dpo` at 1e-3 beside `dpo_lr2e-4`) or that of earlier runs (recipe `dpo` at
    2e-4 beside `dpo_fit` at 1e-3). None when the runs have neither."""
    if "rto_dpo_fit" in methods:
        return {"better": "rto_dpo_fit", "worse": "rto", "better_dpo": "dpo_fit",
                "worse_dpo": "dpo"}  # fmt: skip
    if f"rto_{DPO_EARLIER}" in methods:
        return {"better": "rto", "worse": f"rto_{DPO_EARLIER}", "better_dpo": "dpo",
                "worse_dpo": DPO_EARLIER}  # fmt: skip
    return None


def dpo_learning_rates(runs: Path, seeds: list[int]) -> dict:
    """The learning rate each DPO model of the comparison was trained at, read from the runs
    (not from today's recipe, which may have changed since they were made)."""
    out = {}
    for stage in ("dpo", "dpo_fit", DPO_EARLIER):
        f = runs / f"seed{seeds[0]}" / stage / "config.yaml"
        if f.is_file():
            out[stage] = (yaml.safe_load(f.read_text()).get("train") or {}).get("lr")
    return out


def heldout_accuracy(runs: Path, seeds: list[int]) -> dict:
    """Held-out pairwise accuracy of the reward model and the DPO models, next to the gold
    reward's on the same pairs (the ceiling under annotator noise), from their summary.json."""
    keys = {"gold": ("rm", "eval/gold_accuracy"), "rm": ("rm", "eval/accuracy")}
    for dpo in ("dpo", "dpo_fit", DPO_EARLIER):
        keys[dpo] = (dpo, "eval/rewards/accuracies")
    out = {
        name: mean_sd([stage_summary(runs, s, stage).get(key) for s in seeds])
        for name, (stage, key) in keys.items()
    }
    return {k: v for k, v in out.items() if v["n"] or k in ("gold", "rm", "dpo")}


def run_environment(runs: Path, seeds: list[int]) -> dict | None:
    """Where the evaluations were made (recorded in each eval summary.json), not where this report
    is written: CPU runs repeat to the last digit only on the same CPU kind and package versions."""
    envs = (stage_summary(runs, s, "eval").get("environment") for s in seeds)
    return next((e for e in envs if e), None)


def stage_summary(runs: Path, seed: int, stage: str) -> dict:
    """A finished stage's summary.json, or {} when that stage has not finished."""
    f = runs / f"seed{seed}" / stage / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def g(res: dict, name: str) -> dict:
    return res["methods"][name]["gold_reward_mean"]


def diff(res: dict, a: str, b: str) -> dict:
    """Paired difference a - b over seeds."""
    va, vb = g(res, a)["values"], g(res, b)["values"]
    return mean_sd([x - y for x, y in zip(va, vb)])


def claims(res: dict) -> list[dict]:
    out = []

    def add(claim: str, holds: str, evidence: str) -> None:
        out.append({"claim": claim, "verdict": holds, "evidence": evidence})

    def fmt(d: dict) -> str:
        per_seed = ", ".join(f"{v:+.3f}" for v in d["values"])
        return f"{d['mean']:+.3f} ± {d['sd']:.3f} (per seed {per_seed})"

    rp, ps = diff(res, "rto", "ppo"), diff(res, "ppo", "sft")
    add(
        "RTO > PPO > SFT",
        weakest(verdict(rp), verdict(ps)),
        f"RTO-PPO {fmt(rp)}; PPO-SFT {fmt(ps)}",
    )
    ts, sd_ = diff(res, "rto", "semi_rto"), diff(res, "semi_rto", "ddpo")
    add("token > sentence > end-of-response granularity", weakest(verdict(ts), verdict(sd_)),
        f"RTO-SemiRTO {fmt(ts)}; SemiRTO-DDPO {fmt(sd_)}")  # fmt: skip
    rs = diff(res, "rs_ppo", "rto")
    se = rs["sd"] / math.sqrt(rs["n"])
    close = abs(rs["mean"]) <= max(2 * se, abs(rp["mean"]) / 2)
    add("RS-PPO close to RTO (the DPO term works as reward shaping)", "yes" if close else "no",
        f"RSPPO-RTO {fmt(rs)}, against the RTO-PPO gap {rp['mean']:+.3f}")  # fmt: skip
    rr = diff(res, "rto_rpp", "rpp")
    add("RTO-RPP > RPP", verdict(rr), f"RTO_RPP-RPP {fmt(rr)}")
    eff = res["sample_efficiency_rto_vs_ppo"]
    reached = [e for e in eff if e is not None]
    text = ", ".join("never" if e is None else f"{e:.2f}" for e in eff)
    add("RTO needs about 1/8 of PPO's data to match PPO's final gold reward",
        "yes" if reached and len(reached) == len(eff) and statistics.fmean(reached) <= 0.25 else "no",
        f"share of the budget RTO needs per seed: {text}")  # fmt: skip

    def at_equal_kl(name: str, label: str) -> tuple[str, str]:
        per_seed = res.get(f"{name}_minus_ppo_at_equal_kl") or []
        eq = [d for d in per_seed if d is not None]
        outside = len(per_seed) - len(eq)
        d = mean_sd(eq)
        text = (f"{label} minus PPO's reward-KL frontier at {label}'s KL {fmt(d)}" if eq
                else "no seed to compare")  # fmt: skip
        return (verdict(d) if eq else "n/a"), text + (
            f"; {outside} seed{'' if outside == 1 else 's'} where {label}'s KL is beyond every PPO run's"
            if outside
            else ""
        )

    add("(our check) RTO > PPO at equal KL to SFT", *at_equal_kl("rto", "RTO"))
    pair = dpo_fit_comparison(res["methods"])
    if pair:
        fit, acc = diff(res, pair["better"], pair["worse"]), res.get("heldout_accuracy", {})
        a, b = (acc.get(pair[k], {}).get("mean") for k in ("worse_dpo", "better_dpo"))
        acc_text = f" (DPO held-out accuracy {a:.3f} -> {b:.3f})" if a and b else ""
        add("(our check) a DPO model fit closer to the ceiling makes RTO better", verdict(fit),
            f"{pair['better']} - {pair['worse']} {fmt(fit)}{acc_text}")  # fmt: skip
        if pair["better"] != "rto":  # earlier runs: the better-fit model was not the recipe's
            add("(our check) RTO with that DPO model > PPO at equal KL",
                *at_equal_kl("rto_dpo_fit", "RTO_DPOfit"))  # fmt: skip
        else:
            add("(our check) RTO with the less-fit DPO model > PPO at equal KL",
                *at_equal_kl(pair["worse"], "RTO_DPO_lr2e-4"))  # fmt: skip
    return out


def plots(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    m = res["methods"]
    groups = [("Table 1", TABLE1), ("ablations", ABLATIONS)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (title, names) in zip(axes, groups):
        means = [m[n]["gold_reward_mean"]["mean"] for n in names]
        sds = [m[n]["gold_reward_mean"]["sd"] for n in names]
        ax.bar(names, means, yerr=sds, capsize=3, color="#4c72b0")
        ax.set_title(f"{title}: held-out gold reward (mean ± sd over seeds)")
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "paper_miniature_methods.png", dpi=120)
    plt.close(fig)
    files.append("paper_miniature_methods.png")

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    fracs = [1 / 8, 1 / 4, 1 / 2, 1.0]
    for method in ("ppo", "rto"):
        names = [f"{method}_b8", f"{method}_b4", f"{method}_b2", method]
        ys = [m[n]["gold_reward_mean"]["mean"] for n in names]
        es = [m[n]["gold_reward_mean"]["sd"] for n in names]
        axes[0].errorbar(fracs, ys, yerr=es, marker="o", capsize=3, label=method.upper())
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("share of the RL budget")
    axes[0].set_ylabel("held-out gold reward")
    axes[0].set_title("data scaling")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    betas = sorted([0.0, 0.05] + BETAS)
    names = ["ppo" if b == 0 else "rto" if b == 0.05 else f"rto_beta{b}" for b in betas]
    axes[1].errorbar(betas, [m[n]["gold_reward_mean"]["mean"] for n in names],
                     yerr=[m[n]["gold_reward_mean"]["sd"] for n in names], marker="o", capsize=3, label="gold")  # fmt: skip
    ax2 = axes[1].twinx()
    ax2.plot(
        betas,
        [m[n]["kl_mean"]["mean"] for n in names],
        color="gray",
        linestyle="--",
        marker="x",
        label="KL",
    )
    ax2.set_ylabel("KL to SFT (gray)")
    axes[1].set_xlabel("beta1 (dpo_reward_scale); 0 = PPO")
    axes[1].set_ylabel("held-out gold reward")
    axes[1].set_title("beta1 sweep")
    axes[1].grid(alpha=0.3)
    ax = axes[2]
    for method, color in (("ppo", "#4c72b0"), ("rto", "#dd8452")):
        names = [n for n in m if n == method or n.startswith(method + "_")]
        if method == "rto":
            names = [n for n in names if n != "rto_rpp"]
        pts = sorted((m[n]["kl_mean"]["mean"], m[n]["gold_reward_mean"]["mean"], n) for n in names)
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            "o",
            color=color,
            label=f"{method.upper()} runs",
        )
        for x, y, n in pts:
            ax.annotate(
                n.replace(method, "").strip("_") or "full",
                (x, y),
                fontsize=7,
                textcoords="offset points",
                xytext=(5, -9) if method == "rto" else (-5, 4),
                ha="left" if method == "rto" else "right",
            )
    ppo_pts = sorted(
        (m[n]["kl_mean"]["mean"], m[n]["gold_reward_mean"]["mean"]) for n in ppo_names() if n in m
    )
    ax.plot(*zip(*ppo_pts), color="#4c72b0", alpha=0.5, label="PPO frontier")
    ax.set_xlabel("KL to SFT (mean over seeds)")
    ax.set_ylabel("held-out gold reward")
    ax.set_title("reward against KL: every PPO and RTO run")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "paper_miniature_scaling_beta.png", dpi=120)
    plt.close(fig)
    files.append("paper_miniature_scaling_beta.png")
    return files


def accuracy_text(acc: dict) -> str:
    names = {
        "gold": "gold reward (ceiling)",
        "rm": "reward model",
        "dpo": "DPO",
        "dpo_fit": "dpo_fit",
        DPO_EARLIER: DPO_EARLIER,
    }
    parts = [f"{label} {acc[k]['mean']:.3f} ± {acc[k]['sd']:.3f}" for k, label in names.items()
             if acc.get(k, {}).get("mean") is not None]  # fmt: skip
    return ", ".join(parts) or "not recorded"


def dpo_fit_section(res: dict, head: str, row) -> list[str]:
    pair = dpo_fit_comparison(res["methods"])
    if not pair:
        return []
    lrs = res.get("dpo_learning_rates") or {}

    def lr(stage: str) -> str:
        return f"{lrs[stage]:g}" if lrs.get(stage) is not None else "(not recorded)"

    b, w = pair["better_dpo"], pair["worse_dpo"]
    return [
        "## A DPO model fit closer to the gold ceiling",
        "",
        f"`{b}` is DPO trained at learning rate {lr(b)}, `{w}` at {lr(w)} (the recipe's is "
        f"`dpo`); `{pair['better']}` and `{pair['worse']}` are RTO with their token rewards. "
        "Held-out pairwise accuracy (mean ± sd over seeds, same pairs): "
        + accuracy_text(res.get("heldout_accuracy") or {})
        + ".",
        "",
        head,
        *[row(n) for n in (w, b, "ppo", "ppo_kl0.05", pair["worse"], pair["better"])],
        "",
    ]


def markdown(res: dict, cl: list[dict], files: list[str], command: str) -> str:
    m = res["methods"]

    def row(n: str) -> str:
        if n not in m:
            return f"| {n} | not run |  |  |  |  |"
        cells = []
        for k in ("gold_reward_mean", "kl_mean", "fluency_rate", "length_mean", "win_rate_vs_sft"):
            d = m[n][k]
            cells.append("" if d["mean"] is None else f"{d['mean']:.3f} ± {d['sd']:.3f}")
        return f"| {n} | " + " | ".join(cells) + " |"

    head = "| method | gold reward | KL to SFT | fluency | length | win rate vs SFT |\n|---|---|---|---|---|---|"
    lines = [
        "# The RTO paper in miniature (built-in sentiment task)",
        "",
        f"Command: `{command}` (add `--workers 3` to run the seeds side by side; the runs are "
        "kept, so a rerun skips every finished stage and rebuilds this report)",
        f"Seeds: {res['seeds']}. Every number is the mean ± sd over seeds of a held-out evaluation "
        "(400 prompts, one sampled response each). Gold reward = VADER compound score in [-1, 1].",
        made_on(res.get("environment")),
        minutes_text(res.get("minutes"), "the seeds side by side, 3 pipelines on 2 CPU cores"),
        "",
        "## The paper's claims, checked",
        "",
        "Differences are paired by seed (same SFT, reward model and DPO model). Verdict: **yes** when "
        "the mean difference is positive by more than two standard errors over seeds, *weak* when "
        "it is positive but within that noise, **no** otherwise.",
        "",
        "| claim | holds here? | evidence |",
        "|---|---|---|",
        *[f"| {c['claim']} | {VERDICT_TEXT[c['verdict']]} | {c['evidence']} |" for c in cl],
        "",
        "## Table 1 in miniature",
        "",
        head,
        *[row(n) for n in TABLE1],
        "",
        "## Ablations (granularity, shaping, critic-free)",
        "",
        head,
        *[row(n) for n in ABLATIONS],
        "",
        "## Data scaling (share of the RL budget)",
        "",
        head,
        *[
            row(n)
            for n in ("ppo_b8", "ppo_b4", "ppo_b2", "ppo", "rto_b8", "rto_b4", "rto_b2", "rto")
        ],
        "",
        "## RTO against PPO at equal KL",
        "",
        f"PPO with smaller KL coefficients ({', '.join(f'{c:g}' for c in sorted(PPO_KL_COEFS, reverse=True))}; "
        "the recipe's is 0.1) moves further from SFT; together with the budget runs these trace "
        "PPO's reward-KL frontier, read at RTO's KL in the claims \"(our check) ... at equal KL\" "
        "above. 0.025 was added after this rerun was first read, because RTO's KL lay beyond PPO's "
        "at 0.05 in one seed; the reading rule is unchanged.",
        "",
        head,
        *[
            row(n)
            for n in ["ppo", *[f"ppo_kl{c}" for c in sorted(PPO_KL_COEFS, reverse=True)], "rto"]
        ],
        "",
        *dpo_fit_section(res, head, row),
        "## beta1 sweep (RTO's dpo_reward_scale; 0 is PPO)",
        "",
        head,
        *[
            row(n)
            for n in [
                "ppo",
                *[f"rto_beta{b}" for b in BETAS if b < 0.05],
                "rto",
                *[f"rto_beta{b}" for b in BETAS if b > 0.05],
            ]
        ],
        "",
        *[f"![{f}]({f})\n" for f in files],
    ]
    return "\n".join(lines)


README = ROOT.parent / "README.md"
START, END = "<!-- paper miniature -->", "<!-- end paper miniature -->"


def readme_block(res: dict) -> str:
    """The README's lines on the miniature (between START and END), from its results."""
    lines = ["- **The paper in miniature** ([report](benchmarks/results/paper_miniature.md); "
             "`python benchmarks/paper_miniature.py --workers 3`):"]  # fmt: skip
    for c in res["claims"]:
        lines.append(f"  - {c['claim']}: {VERDICT_TEXT.get(c['verdict'], c['verdict'])}; {c['evidence']}")  # fmt: skip
    return "\n".join(lines)


def readme_with(res: dict, text: str) -> str:
    return replace_marked(text, START, END, readme_block(res), "README.md")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--workers", type=int, default=2, help="Pipelines run at once (one thread each)."
    )
    ap.add_argument(
        "--runs",
        default=str(ROOT / "_runs" / "paper"),
        help="Where the runs go (kept for resuming).",
    )
    ap.add_argument("--results", default=str(ROOT / "results"), help="Where the report goes.")
    ap.add_argument("--report-only", action="store_true", help="Only aggregate finished runs.")
    args = ap.parse_args(argv)
    runs, results = Path(args.runs), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    seconds = None
    if not args.report_only:
        began = time.time()
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            outcomes = list(pool.map(lambda s: run_seed(s, runs), args.seeds))
        seconds = time.time() - began
        for s, (code, secs) in zip(args.seeds, outcomes):
            print(
                f"seed {s}: exit {code} after {secs / 60:.1f} min (log: {runs / f'seed{s}' / 'log.txt'})"
            )
        if any(code for code, _ in outcomes):
            raise SystemExit("some seeds failed; rerun the same command to resume them")
    saved = results / "paper_miniature.json"
    if args.report_only and not finished_seeds(runs, args.seeds) and saved.is_file():
        print(f"no finished seeds under {runs}: rebuilding the report from {saved}")
        res = saved_aggregate(saved)
    else:
        res = aggregate(runs, args.seeds)
    cl = claims(res)
    files = plots(res, results)
    # the command that reproduces these numbers (workers, folders and --report-only do not change them)
    command = res.get("command") or "python benchmarks/paper_miniature.py --seeds " + " ".join(
        map(str, args.seeds)
    )
    res.update({"claims": cl, "command": command, "minutes_this_invocation": round(seconds / 60, 1) if seconds else None})  # fmt: skip
    (results / "paper_miniature.json").write_text(json.dumps(res, indent=2) + "\n")
    (results / "paper_miniature.md").write_text(markdown(res, cl, files, command))
    if results.resolve() == (ROOT / "results").resolve():  # the published report: the README too
        README.write_text(readme_with(res, README.read_text()))
    for c in cl:
        print(f"{c['verdict'].upper()}: {c['claim']} -- {c['evidence']}")


if __name__ == "__main__":
    main()
