"""How long will the token-reward study take? (`token_reward_study.py --estimate`)

For each review length, a timing probe in benchmarks/_runs/token_reward_estimate/LENGTH/ runs
the study's task and SFT stages in full (so that responses have their real lengths), then every
other kind of stage twice, shortened to two sizes (steps, prompts), at the study's model size.
Each stage's CPU time (user + sys of the `rto pipeline` process, which runs with one thread) is
what it takes on one idle core whatever else runs on the machine, where wall time under load is
not: the probe runs the pipeline on its first 1, 2, ... stages (finished stages are skipped) and
takes the CPU seconds of each run, less those of a run that skips every stage (start-up,
imports, planning). The two sizes give each kind of stage a fixed cost and a cost per step or
prompt, scaled to the study's sizes; the study's folders then run on `workers` cores, costliest
first (its schedule), each pipeline on a core of its own. The estimate therefore holds for a
machine with a core free for every worker; a loaded machine stretches the wall time, not the
CPU time. (CPU time itself grows a little under load, when cores share caches: the load averages
while timing are recorded next to the numbers.)

RL stages are timed on their first iterations; responses get longer as RL goes on (short reviews:
15 to 24 tokens in the paper miniature), so the RL part may take up to about a third longer: the
upper end of the range printed. The study records every unit's own CPU time (time_UNIT.jsonl in
its folder, a line per invocation) to check this estimate against.
"""

from __future__ import annotations

import copy
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench_common as common
import token_reward_design as design
import yaml

SMALL, LARGE = {"steps": 10, "rl_steps": 3, "prompts": 100, "eval": 50}, {
    "steps": 30, "rl_steps": 8, "prompts": 300, "eval": 150}  # fmt: skip
RL_GROWTH = 1.33  # upper end: RL responses grow during training (see the docstring)
SKIP_ALL = "(a run that skips every stage)"


def probe_recipe(length: str, out: Path) -> dict:
    """The study's recipe for this length with every stage after SFT shortened, at both sizes."""
    full = design.recipe_for(length, 0, out)
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
    for tag, size in sizes:
        for method in ("ppo", "rto"):
            probe[f"rl_{method}_{tag}"] = {"stage": "rl", "preset": method, "reward_model": "{rm_large}",
                                           "dpo_model": "{dpo_large}", "train": {"max_steps": size["rl_steps"]}}  # fmt: skip
        ev = copy.deepcopy(stages[f"eval_{length}"])
        ev.update(policies=["sft={sft}"], reward_model="{rm_large}")
        ev["eval"]["num_prompts"] = size["eval"]
        probe[f"eval_{tag}"] = ev
    return {**full, "description": f"token-reward study: timing probe, {length}", "stages": probe}


def measure(root: Path, recipe: dict) -> dict[str, dict]:
    """CPU and wall seconds of every stage of `recipe` (see the module's docstring), recorded in
    root/stage_times.json as they are measured, so that an interrupted probe resumes."""
    record_file = root / "stage_times.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    names = list(recipe["stages"])
    for i, name in enumerate([*names, SKIP_ALL]):
        prefix = {**recipe, "stages": {n: recipe["stages"][n] for n in names[: i + 1]}}
        before = os.getloadavg()[0]
        code, wall, cpu = common.run_pipeline_timed(prefix, root / "recipe.yaml", root / "log.txt")
        if code:
            raise SystemExit(f"timing probe failed at {name} (exit {code}); see {root / 'log.txt'}")
        ran = json.loads((root / "pipeline_run.json").read_text())
        if name == SKIP_ALL or ran[name]["status"] == "ran":
            record[name] = {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
                            "load_average": [round(before, 2), round(os.getloadavg()[0], 2)]}  # fmt: skip
            record_file.write_text(json.dumps(record, indent=2) + "\n")
        elif name not in record:
            raise SystemExit(f"{name} had finished before this probe could time it: remove {root} "
                             "and run --estimate again")  # fmt: skip
    overhead = record[SKIP_ALL]["cpu_s"]
    return {
        n: {**record[n], "stage_cpu_s": round(max(0.0, record[n]["cpu_s"] - overhead), 2)}
        for n in names
    }


def fit(times: dict[str, dict], name: str, small: float, large: float) -> tuple[float, float]:
    """(fixed CPU seconds, CPU seconds per unit) of a stage kind from its two shortened runs."""
    t_small, t_large = times[f"{name}_small"]["stage_cpu_s"], times[f"{name}_large"]["stage_cpu_s"]
    per = max(0.0, (t_large - t_small) / (large - small))
    return max(0.0, t_small - per * small), per


def length_costs(root: Path, times: dict[str, dict], length: str) -> dict:
    """CPU seconds of each unit's work at this length, at the study's sizes."""
    recipe = yaml.safe_load(common.BASE_RECIPE.read_text())
    rl_steps = recipe["defaults"]["rl"]["train"]["max_steps"]
    pairs_summary = json.loads((root / "pairs_large" / "summary.json").read_text())
    prompts = len((root / "task" / "prompts_train.jsonl").read_text().splitlines())
    pairs_per_prompt = pairs_summary["pairs_train"] / (LARGE["prompts"] * 0.9)
    n_pairs = prompts * 0.9 * pairs_per_prompt
    steps = {k: math.ceil(n_pairs / recipe["stages"][k]["train"]["batch_size"]) * recipe["stages"][k]["train"]["epochs"]
             for k in ("rm", "dpo")}  # fmt: skip
    pairs = fit(times, "pairs", SMALL["prompts"], LARGE["prompts"])
    rm, dpo = (fit(times, k, SMALL["steps"], LARGE["steps"]) for k in ("rm", "dpo"))
    ppo, rto = (fit(times, f"rl_{k}", SMALL["rl_steps"], LARGE["rl_steps"]) for k in ("ppo", "rto"))
    ev = fit(times, "eval", SMALL["eval"], LARGE["eval"])
    n_eval = recipe["stages"]["eval"]["eval"]["num_prompts"]
    overhead = times["task"]["cpu_s"] - times["task"]["stage_cpu_s"]  # one per pipeline

    def cost(f: tuple[float, float], n: float) -> float:
        return f[0] + f[1] * n

    k = len(design.PPO_KL_COEFS)
    k_own = len(design.FULL.coefs(length))  # this length's own frontier

    def rl_runs(growth: float, k: int = k) -> float:  # PPO at every KL coefficient, and RTO
        return growth * (k * cost(ppo, rl_steps) + cost(rto, rl_steps))

    def evaluation(policies: int) -> float:
        return cost(ev, n_eval * policies)

    task, sft = times["task"]["stage_cpu_s"], times["sft"]["stage_cpu_s"]
    base = (
        overhead
        + task
        + sft
        + cost(pairs, prompts)
        + cost(rm, steps["rm"])
        + cost(dpo, steps["dpo"])
    )
    rms = sum(cost(rm, steps["rm"] * s) for s in design.RM_SHARES.values())
    out = {"pairs": round(n_pairs), "per_stage_cpu_s": {
        "pipeline_start": overhead, "task": task, "sft": sft, "pairs": cost(pairs, prompts),
        "rm": cost(rm, steps["rm"]), "dpo": cost(dpo, steps["dpo"]), "rl_ppo": cost(ppo, rl_steps),
        "rl_rto": cost(rto, rl_steps), "eval_per_policy": ev[1] * n_eval}}  # fmt: skip
    n_rm = len(design.RM_SHARES)
    for growth, tag in ((1.0, "low"), (RL_GROWTH, "high")):
        own = base + rl_runs(growth, k_own) + evaluation(k_own + 3)  # + sft, dpo, rto
        out[f"unit_cpu_s_{tag}"] = {length: own}
        if length == "short":  # these units reuse short's task, SFT, pairs, reward model and DPO
            out[f"unit_cpu_s_{tag}"]["rm_data"] = (
                overhead + rms + n_rm * rl_runs(growth) + evaluation(n_rm * (k + 1) + 1)
            )
            out[f"unit_cpu_s_{tag}"]["oracle"] = overhead + rl_runs(growth) + evaluation(k + 2)
    return out


def makespan(chains: list[list[float]], workers: int) -> float:
    """Wall time of chains run in order by `workers` (each takes the next chain when free)."""
    free = [0.0] * workers
    for chain in chains:
        i = free.index(min(free))
        free[i] += sum(chain)
    return max(free)


def predict(costs: dict[str, dict], seeds: list[int], workers: int) -> dict:
    """Minutes of the study from the units' CPU seconds: low (RL as timed) and high (RL_GROWTH)."""
    out = {}
    for tag in ("low", "high"):
        units = {u: s for c in costs.values() for u, s in c[f"unit_cpu_s_{tag}"].items()}
        chains = [[units[u] for _, u in chain] for chain in design.jobs(seeds, list(units))]
        out[f"minutes_{tag}"] = {
            "cpu_minutes": round(sum(map(sum, chains)) / 60, 1),
            f"wall_minutes_{workers}_workers": round(makespan(chains, workers) / 60, 1),
            "per_unit_cpu_minutes": {u: round(s / 60, 1) for u, s in units.items()},
        }
    return out


def main(runs: Path, seeds: list[int], workers: int, results: Path) -> None:
    def probe(length: str) -> tuple[dict, dict]:
        root = runs / length
        root.mkdir(parents=True, exist_ok=True)
        times = measure(root, probe_recipe(length, root))
        return times, length_costs(root, times, length)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        measured = dict(zip(design.LENGTHS, pool.map(probe, design.LENGTHS)))
    costs = {length: c for length, (_, c) in measured.items()}
    summary = runs / "short" / "eval_large" / "summary.json"
    times = {length: t for length, (t, _) in measured.items()}
    loads = [x for t in times.values() for r in t.values() for x in r["load_average"]]
    wall, cpu = (sum(r[k] for t in times.values() for r in t.values()) for k in ("wall_s", "cpu_s"))
    result = {
        "command": f"python benchmarks/token_reward_study.py --estimate --workers {workers}",
        "how": "CPU time (user + sys) of each stage of shortened runs at the study's model size, "
        "scaled to the study's steps and prompts; wall time = the study's schedule on "
        f"{workers} free cores (benchmarks/token_reward_estimate.py)",
        "environment": json.loads(summary.read_text()).get("environment"),
        "cores": os.cpu_count(),
        "while_timed": {
            "load_average_1min_range": [min(loads), max(loads)],
            "probe_wall_over_cpu": round(wall / cpu, 2),
        },  # fmt: skip
        "per_length": costs,
        "stage_times": times,
        **predict(costs, seeds, workers),
    }
    (runs / "estimate.json").write_text(json.dumps(result, indent=2) + "\n")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n")
    for length, c in costs.items():
        print(f"{length}: " + ", ".join(f"{k} {v:.0f} s" for k, v in c["per_stage_cpu_s"].items()))
    lo, hi = result["minutes_low"], result["minutes_high"]
    key = f"wall_minutes_{workers}_workers"
    print(f"units (CPU minutes): {lo['per_unit_cpu_minutes']} to {hi['per_unit_cpu_minutes']}")
    print(f"the study, seeds {seeds}, {workers} workers on free cores: about {lo[key]:.0f} to "
          f"{hi[key]:.0f} min ({lo['cpu_minutes']:.0f} to {hi['cpu_minutes']:.0f} CPU minutes); "
          f"timed under a load average of {min(loads):.1f} to {max(loads):.1f}, wall / CPU "
          f"{result['while_timed']['probe_wall_over_cpu']}; details in {results}")  # fmt: skip
