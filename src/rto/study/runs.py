"""Running a study: one `rto pipeline` per seed, holding every condition and arm, then reading
what each evaluation measured. Stages whose resolved content is the same in two conditions are
one stage (a condition that changes only the reward model shares SFT and pairs with the others),
so each thing is trained once per seed; the pipeline skips stages finished with the same
fingerprint, so a rerun resumes where it stopped and reuses finished runs.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from rto.pipeline import STAGE_REF, deep_merge
from rto.study.spec import Spec

METRICS = ("gold_reward_mean", "kl_mean", "fluency_rate", "length_mean", "win_rate_vs_sft",
           "rm_score_mean", "distinct_2")  # fmt: skip


def stage_name(arm: str) -> str:
    """An arm's stage: 'arm_' and its name with '.' as 'p' (stage names take no dots)."""
    return "arm_" + arm.replace(".", "p").replace("/", "_")


def eval_stage(condition: str) -> str:  # the condition's evaluation of every arm
    return "eval" if condition == "main" else "eval_" + re.sub(r"[^A-Za-z0-9_\-]", "_", condition)


def condition_stages(spec: Spec, condition: str, seed: int) -> dict[str, dict[str, Any]]:
    """The stages of one condition, in order, each with its kind's defaults merged in (so two
    conditions' stages compare by content), referring to each other by {name}."""
    recipe = yaml.safe_load(spec.recipe_file().read_text(encoding="utf-8"))
    recipe = deep_merge(deep_merge(recipe, spec.recipe_overrides), spec.conditions[condition])
    stages, defaults = recipe.get("stages") or {}, recipe.get("defaults") or {}

    def full(spec_: dict[str, Any]) -> dict[str, Any]:
        spec_ = copy.deepcopy(spec_)
        if "from" in spec_:
            spec_ = deep_merge(stages[spec_.pop("from")], spec_)
        spec_.setdefault("stage", "rl")
        return deep_merge(defaults.get(spec_["stage"]) or {}, spec_)

    out = {name: full(stages[name]) for name in spec.shared}
    out.update({name: full(extra) for name, extra in spec.stages.items()})
    policies = []
    for arm, arm_spec in spec.all_arms().items():
        arm_spec = dict(arm_spec)
        if condition not in arm_spec.pop("conditions", [condition]):
            continue  # an arm run in some conditions only
        if "model" in arm_spec:
            policies.append(f"{arm}={{{arm_spec['model']}}}")
        else:
            out[stage_name(arm)] = full(arm_spec)
            policies.append(f"{arm}={{{stage_name(arm)}}}")
    evaluation = full(stages[spec.evaluate])
    evaluation["policies"] = policies
    evaluation.setdefault("seed", seed)
    out[eval_stage(condition)] = evaluation
    return out


def seed_recipe(
    spec: Spec, seed: int, out: Path
) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """One pipeline recipe for a seed over every condition, and per condition the stage each of
    its own stage names became (identical stages across conditions merged into the first)."""
    merged: dict[str, dict[str, Any]] = {}
    by_content: dict[str, str] = {}
    names: dict[str, dict[str, str]] = {}
    for condition in spec.conditions:
        rename: dict[str, str] = {}
        for name, stage in condition_stages(spec, condition, seed).items():
            text = STAGE_REF.sub(lambda m, r=rename: "{" + r.get(m.group(1), m.group(1)) + "}",
                           json.dumps(stage, sort_keys=True))  # fmt: skip
            if text in by_content:
                rename[name] = by_content[text]
                continue
            unique = (
                name if name not in merged else f"{name}_{re.sub(r'[^A-Za-z0-9_]', '_', condition)}"
            )
            merged[unique] = json.loads(text)
            by_content[text] = rename[name] = unique
        names[condition] = rename
    recipe = {"description": f"study {spec.name}, seed {seed}", "out": str(out), "seed": seed,
              "stages": merged}  # fmt: skip
    return recipe, names


def check_recipe(spec: Spec, recipe: dict[str, Any]) -> None:
    """Every stage of a seed's recipe is a valid config (`rto pipeline`'s own check), before any
    run: an error names the study file and the arm or stage."""
    import tempfile

    from rto.errors import ConfigError
    from rto.pipeline import plan

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        try:
            plan(str(path))
        except ConfigError as exc:
            text = str(exc).replace(f"{path} ", "").replace(str(path), "the seed's recipe")
            text = re.sub(r"\(in \(stage arm_([^)]+)\)\)", r"(arm \1)", text)
            text = re.sub(r"\(in \(stage ([^)]+)\)\)", r"(stage \1)", text)
            raise ConfigError(f"study file {spec.path}: {text}") from None


def seed_folder(runs: Path, seed: int) -> Path:
    return runs / f"seed{seed}"


def run_seed(spec: Spec, seed: int, runs: Path, threads: int) -> dict[str, Any]:
    """`rto pipeline` over the seed's recipe in a process of its own with `threads` threads (runs
    side by side do not slow each other down; a rerun repeats the numbers on the same CPU kind);
    its exit code, wall and CPU seconds, appended to the seed folder's time.jsonl."""
    folder = seed_folder(runs, seed)
    recipe, _ = seed_recipe(spec, seed, folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    began = time.time()
    with open(folder / "log.txt", "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rto", "pipeline", "--config", str(folder / "recipe.yaml")],
                                stdout=log, stderr=log, env=env)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    row = {"seed": seed, "exit": os.waitstatus_to_exitcode(status), "wall_s": round(time.time() - began, 1),
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "ended": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    with open(folder / "time.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def run_all(spec: Spec, runs: Path, workers: int, say=print) -> list[dict[str, Any]]:
    """Every seed's pipeline, `workers` side by side (one thread each when more than one)."""
    threads = 1 if workers > 1 else max(1, os.cpu_count() or 1)

    def one(seed: int) -> dict[str, Any]:
        say(f"seed {seed}: running (log: {seed_folder(runs, seed) / 'log.txt'})")
        row = run_seed(spec, seed, runs, threads)
        say(f"seed {seed}: exit {row['exit']} after {row['wall_s'] / 60:.1f} min")
        return row

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, spec.seeds))


def read_rollout_curve(folder: Path) -> list[list[float]]:
    """[samples, mean gold reward of the iteration's rollouts] of one RL run ([] when none)."""
    f = folder / "metrics.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
    return [[r["samples"], r["rollout/gold_reward"]] for r in rows if "rollout/gold_reward" in r]


def collect(spec: Spec, runs: Path) -> dict[str, Any]:
    """What the finished evaluations measured: per condition, seed and arm its metrics; the RL
    arms' rollout curves; where and at what cost the runs were made."""
    per_seed: dict[str, dict[str, dict]] = {c: {} for c in spec.conditions}
    curves: dict[str, dict[str, dict]] = {c: {} for c in spec.conditions}
    environment, cpu_s = None, 0.0
    for seed in spec.seeds:
        folder = seed_folder(runs, seed)
        _, names = seed_recipe(spec, seed, folder)
        for condition, rename in names.items():
            result = folder / rename[eval_stage(condition)] / "eval.json"
            if not result.is_file():
                continue
            methods = json.loads(result.read_text())["methods"]
            per_seed[condition][str(seed)] = {arm: {m: methods[arm].get(m) for m in METRICS if m in methods[arm]}
                                              for arm in methods}  # fmt: skip
            curves[condition][str(seed)] = {arm: c for arm in spec.all_arms()
                                            if stage_name(arm) in rename
                                            and (c := read_rollout_curve(folder / rename[stage_name(arm)]))}  # fmt: skip
            summary = folder / rename[eval_stage(condition)] / "summary.json"
            if environment is None and summary.is_file():
                environment = json.loads(summary.read_text()).get("environment")
        times = folder / "time.jsonl"
        if times.is_file():
            cpu_s += sum(json.loads(x)["cpu_s"] for x in times.read_text().splitlines() if x.strip())  # fmt: skip
    return {"per_seed": per_seed, "curves": curves, "environment": environment,
            "cpu_hours": round(cpu_s / 3600, 2)}  # fmt: skip
