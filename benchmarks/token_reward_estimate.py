"""How long will the token-reward study take on this machine? (`token_reward_study.py --estimate`)

For each review length, one `rto pipeline` in benchmarks/_runs/token_reward_estimate/ runs the
study's task and SFT stages in full (so that responses have their real lengths), then every
other kind of stage twice, shortened to two sizes (steps, prompts); each stage's wall time
(recorded by the pipeline) gives a fixed cost and a cost per step or prompt, which scale to the
study's sizes. The study's folders then run on `workers` cores, costliest first (its schedule).

Run it on an otherwise idle machine (it warns when the load average says otherwise): one
pipeline with one thread at a time, so wall time is the time of one core. RL stages are timed
on their first iterations; responses get longer as RL goes on (short reviews: 15 to 24 tokens
in the paper miniature), so the RL part may take up to about a third longer: the upper end of
the range printed.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import paper_miniature as pm
import token_reward_study as study
import yaml

SMALL, LARGE = {"steps": 10, "rl_steps": 3, "prompts": 100, "eval": 50}, {
    "steps": 30, "rl_steps": 8, "prompts": 300, "eval": 150}  # fmt: skip
RL_GROWTH = 1.33  # upper end: RL responses grow during training (see the docstring)


def probe_recipe(length: str, out: Path) -> dict:
    """The study's recipe for this length with every stage after SFT shortened, at both sizes."""
    full = study.recipe_for(length, 0, out)
    stages = full["stages"]
    probe = {k: stages[k] for k in ("task", "sft")}
    sizes = (("small", SMALL), ("large", LARGE))
    for tag, size in sizes:
        probe[f"pairs_{tag}"] = copy.deepcopy(stages["pairs"])
        probe[f"pairs_{tag}"]["data"]["max_rows"] = size["prompts"]
    for tag, size in sizes:
        for kind in ("rm", "dpo"):  # both read the larger pair set, so a step is a full batch
            st = copy.deepcopy(stages[kind])
            st["data"] = {k: v.replace("{pairs}", "{pairs_large}") for k, v in st["data"].items()}
            st["train"]["max_steps"] = size["steps"]
            probe[f"{kind}_{tag}"] = st
    for tag, size in (("small", SMALL), ("large", LARGE)):
        for method in ("ppo", "rto"):
            probe[f"rl_{method}_{tag}"] = {"stage": "rl", "preset": method, "reward_model": "{rm_large}",
                                           "dpo_model": "{dpo_large}", "train": {"max_steps": size["rl_steps"]}}  # fmt: skip
        ev = copy.deepcopy(stages[f"eval_{length}"])
        ev.update(policies=["sft={sft}"], reward_model="{rm_large}")
        ev["eval"]["num_prompts"] = size["eval"]
        probe[f"eval_{tag}"] = ev
    return {**full, "description": f"token-reward study: timing probe, {length}", "stages": probe}


def seconds(folder: Path) -> float:
    return json.loads((folder / "pipeline.json").read_text())["seconds"]


def fit(root: Path, name: str, small: float, large: float) -> tuple[float, float]:
    """(fixed seconds, seconds per unit) of a stage kind from its two shortened runs."""
    t_small, t_large = seconds(root / f"{name}_small"), seconds(root / f"{name}_large")
    per = max(0.0, (t_large - t_small) / (large - small))
    return max(0.0, t_small - per * small), per


def length_costs(root: Path, length: str) -> dict[str, float]:
    """Seconds of each unit's work at this length, at the study's sizes."""
    recipe = yaml.safe_load(study.BASE_RECIPE.read_text())
    rl_steps = recipe["defaults"]["rl"]["train"]["max_steps"]
    pairs_summary = json.loads((root / "pairs_large" / "summary.json").read_text())
    prompts = len((root / "task" / "prompts_train.jsonl").read_text().splitlines())
    pairs_per_prompt = pairs_summary["pairs_train"] / (LARGE["prompts"] * 0.9)
    n_pairs = prompts * 0.9 * pairs_per_prompt
    steps = {k: math.ceil(n_pairs / recipe["stages"][k]["train"]["batch_size"]) * recipe["stages"][k]["train"]["epochs"]
             for k in ("rm", "dpo")}  # fmt: skip
    pairs = fit(root, "pairs", SMALL["prompts"], LARGE["prompts"])
    rm, dpo = (fit(root, k, SMALL["steps"], LARGE["steps"]) for k in ("rm", "dpo"))
    ppo, rto = (fit(root, f"rl_{k}", SMALL["rl_steps"], LARGE["rl_steps"]) for k in ("ppo", "rto"))
    ev = fit(root, "eval", SMALL["eval"], LARGE["eval"])
    n_eval = recipe["stages"]["eval"]["eval"]["num_prompts"]

    def cost(f: tuple[float, float], n: float) -> float:
        return f[0] + f[1] * n

    k = len(study.PPO_KL_COEFS)

    def rl_runs(growth: float) -> float:  # PPO at every KL coefficient, and RTO
        return growth * (k * cost(ppo, rl_steps) + cost(rto, rl_steps))

    def evaluation(policies: int) -> float:
        return cost(ev, n_eval * policies)

    base = (seconds(root / "task") + seconds(root / "sft") + cost(pairs, prompts)
            + cost(rm, steps["rm"]) + cost(dpo, steps["dpo"]))  # fmt: skip
    rms = sum(cost(rm, steps["rm"] * s) for s in study.RM_SHARES.values())
    out = {"pairs": n_pairs, "per_stage": {"task": seconds(root / "task"), "sft": seconds(root / "sft"),
           "pairs": cost(pairs, prompts), "rm": cost(rm, steps["rm"]), "dpo": cost(dpo, steps["dpo"]),
           "rl_ppo": cost(ppo, rl_steps), "rl_rto": cost(rto, rl_steps), "eval_per_policy": ev[1] * n_eval}}  # fmt: skip
    n_rm = len(study.RM_SHARES)
    for growth, tag in ((1.0, "low"), (RL_GROWTH, "high")):
        out[f"unit_{tag}"] = {length: base + rl_runs(growth) + evaluation(k + 3)}  # sft, dpo too
        if length == "short":
            out[f"unit_{tag}"]["rm_data"] = (
                rms + n_rm * rl_runs(growth) + evaluation(n_rm * (k + 1) + 1)
            )
            out[f"unit_{tag}"]["oracle"] = rl_runs(growth) + evaluation(k + 2)
    return out


def makespan(chains: list[list[float]], workers: int) -> float:
    """Wall time of chains run in order by `workers` (each takes the next chain when free)."""
    free = [0.0] * workers
    for chain in chains:
        i = free.index(min(free))
        free[i] += sum(chain)
    return max(free)


def main(runs: Path, seeds: list[int], workers: int, results: Path) -> None:
    load = os.getloadavg()[0]
    if load > 1.2:
        print(f"warning: load average {load:.1f}: other work is running; stages timed now (not "
              "those already finished under {runs}) will take longer than on an idle machine")  # fmt: skip
    costs, loads = {}, {}
    for length in study.LENGTHS:
        root = runs / length
        before = os.getloadavg()[0]
        code, _ = pm.run_pipeline(
            probe_recipe(length, root), root / "recipe.yaml", root / "log.txt"
        )
        if code:
            raise SystemExit(f"timing probe {length} failed (exit {code}); see {root / 'log.txt'}")
        ran = json.loads((root / "pipeline_run.json").read_text())
        if any(r["status"] == "ran" for r in ran.values()):  # else timed by an earlier call
            (root / "load.json").write_text(
                json.dumps({"before": before, "after": os.getloadavg()[0]})
            )
        loads[length] = json.loads((root / "load.json").read_text())
        costs[length] = length_costs(root, length)
    summary = runs / "short" / "eval_large" / "summary.json"
    result = {
        "command": "python benchmarks/token_reward_study.py --estimate",
        "environment": json.loads(summary.read_text()).get("environment"),
        "load_average_while_timed": loads,  # 1-minute averages; the probes use one core
        "per_length": costs,
    }
    for tag in ("low", "high"):
        units = {u: s for c in costs.values() for u, s in c[f"unit_{tag}"].items()}
        chains = [[units[u] for _, u in chain] for chain in study.jobs(seeds, list(units))]
        result[f"minutes_{tag}"] = {
            "core_minutes": sum(map(sum, chains)) / 60,
            f"wall_minutes_{workers}_workers": makespan(chains, workers) / 60,
            "per_unit": {u: round(s / 60, 1) for u, s in units.items()},
        }
    (runs / "estimate.json").write_text(json.dumps(result, indent=2) + "\n")
    results.write_text(json.dumps(result, indent=2) + "\n")
    for length, c in costs.items():
        print(f"{length}: " + ", ".join(f"{k} {v:.0f} s" for k, v in c["per_stage"].items()))
    lo, hi = result["minutes_low"], result["minutes_high"]
    print(f"units (minutes of one core): {lo['per_unit']} to {hi['per_unit']}")
    print(f"the study, seeds {seeds}, {workers} workers: about {lo[f'wall_minutes_{workers}_workers']:.0f} "
          f"to {hi[f'wall_minutes_{workers}_workers']:.0f} min ({lo['core_minutes']:.0f} to "
          f"{hi['core_minutes']:.0f} core-minutes); details in {results}")  # fmt: skip
