"""What the benchmarks share: the runner (`rto pipeline` in a process of its own), statistics over
seeds, PPO's reward-KL frontier and the verdicts that read them.

Used by paper_miniature.py and the token-reward study (token_reward_design.py, _report.py,
_estimate.py, _study.py). A script run as `python benchmarks/X.py` finds this module beside it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
BASE_RECIPE = ROOT.parent / "src" / "rto" / "recipes" / "sentiment_quick.yaml"  # every benchmark's


# --------------------------------------------------------------------------- runner


def run_pipeline(recipe: dict, recipe_file: Path, log_file: Path) -> tuple[int, float]:
    """`rto pipeline` on `recipe` in its own process with one thread (so that runs side by side
    do not slow each other down and reruns repeat the numbers); (exit code, seconds)."""
    code, seconds, _ = run_pipeline_timed(recipe, recipe_file, log_file)
    return code, seconds


def run_pipeline_timed(recipe: dict, recipe_file: Path, log_file: Path) -> tuple[int, float, float]:
    """As run_pipeline, also giving the CPU seconds (user + sys) the pipeline used: what it costs
    on an idle core whatever else ran beside it, where wall time under load is not."""
    recipe_file.parent.mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    began = time.time()
    with open(log_file, "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rto", "pipeline", "--config", str(recipe_file)],
            stdout=log,
            stderr=log,
            env=env,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource use
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - began, usage.ru_utime + usage.ru_stime


def stage_minutes(folders: list[Path], stages: list[str] | None = None) -> dict:
    """What a study's runs took, from the wall time each of its finished stages (`stages`, or
    every stage in the folder) recorded in `pipeline.json`: per folder that has any (one seed's
    pipeline) and in all, in minutes. Stages of side-by-side pipelines shared the cores, so these
    are times under that load."""
    per = {}
    for folder in folders:
        files = [folder / s / "pipeline.json" for s in stages] if stages else folder.glob("*/pipeline.json")  # fmt: skip
        secs = [json.loads(f.read_text()).get("seconds") or 0.0 for f in files if f.is_file()]
        if secs:
            per[str(folder.relative_to(folder.parent.parent))] = round(sum(secs) / 60, 1)
    return {"per_pipeline": per, "total": round(sum(per.values()), 1),
            "slowest": max(per.values(), default=0.0)}  # fmt: skip


def minutes_text(m: dict | None, side_by_side: str) -> str:
    """One sentence on what the runs took (stage_minutes), for a report's opening."""
    if not m or not m.get("total"):
        return ""
    return (f"Time: the stages' own wall times sum to {m['total']:.0f} min over "
            f"{len(m['per_pipeline'])} pipelines (the slowest {m['slowest']:.0f} min), {side_by_side}.")  # fmt: skip


# --------------------------------------------------------------------------- statistics over seeds


def mean_sd(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}  # fmt: skip


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the piecewise-linear curve through (x, y) points; None outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    return None


def efficiency(gold_by_budget: dict[float, float], target: float) -> float | None:
    """Smallest budget fraction where the curve (linear between measured budgets) reaches target."""
    points = sorted(gold_by_budget.items())
    if points[0][1] >= target:
        return points[0][0]
    for (f0, g0), (f1, g1) in zip(points, points[1:]):
        if g0 < target <= g1:
            return f0 + (target - g0) / (g1 - g0) * (f1 - f0)
    return None  # never reached within the budget


# --------------------------------------------------------------------------- frontier


def above_ppo_frontier(
    res: dict, name: str, ppo: list[str], metric: str = "gold_reward_mean"
) -> float | None:
    """`metric` (the gold reward) of `name` minus the reward-KL frontier of the runs `ppo` (PPO's,
    or any method's runs at several KL coefficients) of the same seed, linear in KL between
    them, read at `name`'s KL; None when that KL is outside the frontier, `name` was not run or
    a run lacks the metric. `res`: one seed's evaluation, policy name -> its metrics."""
    runs = [res[n] for n in ppo if n in res]
    if name not in res or any(m.get(metric) is None for m in [res[name], *runs]):
        return None
    at = interpolate([(m["kl_mean"], m[metric]) for m in runs], res[name]["kl_mean"])
    return None if at is None else res[name][metric] - at


def claims_block(header: str, claims: list[dict], verdict_text: dict) -> str:
    """A README block from a study's results: its header line, then one line per claim (the
    claim, its verdict as `verdict_text` writes it, the evidence)."""
    lines = [header]
    for c in claims:
        lines.append(f"  - {c['claim']} {verdict_text.get(c['verdict'], c['verdict'])}: {c['evidence']}")  # fmt: skip
    return "\n".join(lines)


def replace_marked(text: str, start: str, end: str, block: str, where: str) -> str:
    """`text` with what lies between the markers `start` and `end` replaced by `block` (a README
    section written from a results file); SystemExit naming `where` when a marker is missing."""
    if start not in text or end not in text:
        raise SystemExit(f"{where} has no {start} ... {end} block to write into")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{block}\n{end}{rest.split(end, 1)[1]}"


# --------------------------------------------------------------------------- verdicts


def verdict(d: dict) -> str:
    """'yes' when a paired difference is positive by more than two standard errors over seeds,
    'weak' when it is positive but within that noise, 'no' otherwise."""
    if d["mean"] is None:
        return "no"
    se = d["sd"] / math.sqrt(d["n"]) if d["n"] > 1 else 0.0
    return "yes" if d["mean"] - 2 * se > 0 else "weak" if d["mean"] > 0 else "no"


def weakest(*verdicts: str) -> str:
    return min(verdicts, key=["no", "weak", "yes"].index)


VERDICT_TEXT = {"yes": "**yes**", "weak": "*weak*", "no": "**no**", "n/a": "cannot tell"}

# --------------------------------------------------------------------------- reports


def made_on(env: dict | None) -> str:
    if not env:
        return "Made on: not recorded."
    p = env.get("packages", {})
    where = ", ".join(env.get("gpus") or [f"{env.get('cpu')} ({env.get('cpu_capability')})"])
    return (f"Made on: {where}; Python {env.get('python')}, torch {p.get('torch')}, transformers "
            f"{p.get('transformers')}. The same command on the same CPU kind and package versions "
            "gives the same numbers; elsewhere float rounding differs and the numbers move within "
            "their spread.")  # fmt: skip
