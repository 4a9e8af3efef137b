"""The token-reward study's report (benchmarks/token_reward_study.py): per-seed results of every
condition, the verdicts of the claims written down in CLAIMS before the runs, tables and plots.

Every difference is paired by seed (same SFT, pairs, reward model and DPO model). The equal-KL
difference is RTO's held-out gold reward minus PPO's reward-KL frontier of the same seed and
condition (PPO at every KL coefficient, linear between them) read at RTO's KL, as in the paper
miniature (`bench_common.above_ppo_frontier`); it is not read where RTO's KL lies outside
that frontier.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import bench_common as common
import token_reward_design as design
import yaml

METRICS = ("gold_reward_mean", "kl_mean", "fluency_rate", "length_mean")
LENGTH_POINTS = ("short", "medium", "long")
VERDICT_TEXT = {**common.VERDICT_TEXT, "partly": "*partly*"}
# the oracle claim's guard: a gain in gold reward bought with malformed text (fluency, RTO minus
# PPO's frontier at RTO's KL, below -FLUENCY_DROP) is read as weak at best (CLAIMS)
FLUENCY_DROP = 0.05


# --------------------------------------------------------------------------- per seed


def read_curve(folder: Path) -> list[tuple[float, float]]:
    """(RL samples so far, mean gold reward of that iteration's rollouts) of one RL run."""
    f = folder / "metrics.jsonl"
    if not f.is_file():
        return []
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [(r["samples"], r["rollout/gold_reward"]) for r in rows if "rollout/gold_reward" in r]


def smooth(curve: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """Trailing mean over `window` iterations (fewer at the start)."""
    ys = [y for _, y in curve]
    return [
        (x, statistics.fmean(ys[max(0, i + 1 - window) : i + 1])) for i, (x, _) in enumerate(curve)
    ]


def sample_efficiency(ppo: list[tuple[float, float]], rto: list[tuple[float, float]]) -> dict:
    """Share of PPO's samples after which RTO's smoothed rollout gold reward first reaches PPO's
    final smoothed value (None: never), with both smoothed curves."""
    window = max(1, round(len(ppo) / 10))
    ppo_s, rto_s = smooth(ppo, window), smooth(rto, window)
    target, total = ppo_s[-1][1], ppo_s[-1][0]
    share = common.efficiency({x / total: y for x, y in rto_s}, target)
    return {"share": share, "ppo_final": target, "curves": {"ppo": ppo_s, "rto": rto_s}}


def point_result(runs: Path, seed: int, point: str) -> dict | None:
    """One seed's results in one condition, or None when its evaluation has not finished."""
    unit, tag = design.POINTS[point]
    folder = design.unit_folder(runs, seed, unit)
    f = folder / f"eval_{unit}" / "eval.json"
    if not f.is_file():
        return None
    methods = json.loads(f.read_text())["methods"]
    pattern = re.compile(rf"^ppo{re.escape(design._sfx(tag))}_kl([0-9.e-]+)$")
    ppo = {float(m.group(1)): n for n in methods if (m := pattern.match(n))}
    rto = design.rto_policy(tag)
    if rto not in methods or not ppo:
        return None

    def row(name: str) -> dict:
        return {k: methods[name].get(k) for k in METRICS}

    coef = design.recipe_kl_coef()
    out = {
        "ppo": {str(c): row(ppo[c]) for c in sorted(ppo)},
        "rto": row(rto),
        "sft": row("sft") if "sft" in methods else None,
        "equal_kl": common.above_ppo_frontier(methods, rto, list(ppo.values())),
        "equal_kl_fluency": common.above_ppo_frontier(
            methods, rto, list(ppo.values()), "fluency_rate"
        ),
        "same_coef": methods[rto]["gold_reward_mean"] - methods[ppo[coef]]["gold_reward_mean"]
        if coef in ppo
        else None,
    }
    curves = (
        read_curve(folder / design.ppo_stage(tag, coef)),
        read_curve(folder / design.rto_stage(tag, unit)),
    )
    if all(curves):
        out["efficiency"] = sample_efficiency(*curves)
    return out


def oracle_check(runs: Path, seeds: list[int]) -> dict | None:
    """Whether the oracle runs' sentence reward was the gold reward and nothing else: over their
    rollouts, the largest difference between the logged reward_fn reward (divided by its weight)
    and the mean gold reward, and how many rollouts also had a reward-model score in their
    reward (None: no oracle run has logged both)."""
    diffs, with_score, weights = [], 0, set()
    for seed in seeds:
        folder = design.unit_folder(runs, seed, "oracle")
        for stage in sorted(folder.glob("rl_*_oracle*")):
            f, cfg = stage / "metrics.jsonl", stage / "config.yaml"
            if not (f.is_file() and cfg.is_file()):
                continue
            weight = ((yaml.safe_load(cfg.read_text()).get("rl") or {}).get("reward_fn") or {}).get(
                "coef"
            )
            weights.add(weight)
            for r in (json.loads(x) for x in f.read_text().splitlines() if x.strip()):
                with_score += "reward/score_sum" in r
                if weight and "reward/reward_fn_sum" in r and "rollout/gold_reward" in r:
                    diffs.append(abs(r["reward/reward_fn_sum"] / weight - r["rollout/gold_reward"]))
    if not diffs:
        return None
    return {"max_abs_difference": max(diffs), "rollouts": len(diffs),
            "rollouts_with_score": with_score, "weights": sorted(weights)}  # fmt: skip


def stage_summary(runs: Path, seed: int, unit: str, stage: str) -> dict:
    f = design.unit_folder(runs, seed, unit) / stage / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def reward_models(runs: Path, seeds: list[int]) -> dict:
    """Per share of the pairs: training pairs and held-out accuracy of the reward model, the gold
    reward's accuracy on the same held-out pairs (the ceiling), and, where rm_same trained one,
    the training pairs and held-out accuracy of the DPO model on that share."""
    out = {}
    for point, share in design.RM_POINTS.items():
        tag = "" if share == 1.0 else f"_{design.POINTS[point][1]}"
        summaries = [stage_summary(runs, s, "short", f"rm{tag}") for s in seeds]
        dpo = [stage_summary(runs, s, "short", f"dpo{tag}") for s in seeds]
        out[point] = {
            "share": share,
            "pairs": common.mean_sd([train_rows(s) for s in summaries]),
            "accuracy": common.mean_sd([s.get("eval/accuracy") for s in summaries]),
            "gold_accuracy": common.mean_sd([s.get("eval/gold_accuracy") for s in summaries]),
        }
        if any(dpo):
            out[point]["dpo_pairs"] = common.mean_sd([train_rows(s) for s in dpo])
            out[point]["dpo_accuracy"] = common.mean_sd(
                [s.get("eval/rewards/accuracies") for s in dpo]
            )
    return out


def train_rows(summary: dict) -> int | None:
    return (summary.get("data") or {}).get("train", {}).get("rows")


def earlier_arm(path: Path | None) -> dict | None:
    """The reward-model-share arm of an earlier report (its DPO model trained on all the pairs):
    per share, the per-seed RTO - PPO at equal KL, shown beside this run's arms, labelled."""
    if path is None or not path.is_file():
        return None
    old = json.loads(path.read_text())
    pts = old.get("points", {})
    return {
        "file": path.name,
        "seeds": old.get("seeds"),
        "equal_kl": {p: pts[p]["equal_kl"] for p in design.RM_POINTS if p in pts},
        "verdict": next((c for c in old.get("claims", []) if c["id"] == "rm_noise"), None),
        "short_gold": short_gold(pts.get("short")),
    }


def short_gold(point: dict | None) -> dict | None:
    """Per-seed held-out gold rewards of a report's all-pairs runs (PPO at every coefficient, RTO),
    to tell whether an earlier report's runs are repeated by this one's."""
    if not point:
        return None
    runs = {f"ppo_kl{c}": m for c, m in point["ppo"].items()} | {"rto": point["rto"]}
    return {name: m["gold_reward_mean"].get("values") for name, m in runs.items()}


# --------------------------------------------------------------------------- the README's lines

README = Path(__file__).resolve().parent.parent / "README.md"
RM_SHARE_STEM = (
    "token_reward_rm_share"  # the reward-model-share report, whose verdicts the README states
)
START, END = "<!-- reward-model share -->", "<!-- end reward-model share -->"


def readme_block(res: dict) -> str:
    """The README's lines on the reward-model-share report (between START and END)."""
    header = (f"- **Less reward-model data** ([report](benchmarks/results/{RM_SHARE_STEM}.md); "
              f"`{res['command']} --workers 3`):")  # fmt: skip
    claims = [c for c in res["claims"] if c["id"].startswith("rm_noise")]
    return common.claims_block(header, claims, VERDICT_TEXT)


def readme_with(res: dict, text: str) -> str:
    return common.replace_marked(text, START, END, readme_block(res), "README.md")


# --------------------------------------------------------------------------- aggregation


def build(
    runs: Path, seeds: list[int], command: str, minutes: float | None, earlier: Path | None = None
) -> dict:
    per_seed = {s: {p: r for p in design.POINTS if (r := point_result(runs, s, p))} for s in seeds}
    per_seed = {s: pts for s, pts in per_seed.items() if pts}
    if not per_seed:
        raise SystemExit(f"no finished condition under {runs}")
    points = {}
    for p in design.POINTS:
        done = {s: pts[p] for s, pts in per_seed.items() if p in pts}
        if done:
            points[p] = summarise(done)
    res = {
        "seeds": list(per_seed),
        "points": points,
        "reward_models": reward_models(runs, list(per_seed)),
        "oracle_check": oracle_check(runs, list(per_seed)),
        "earlier_arm": earlier_arm(earlier),
        "minutes": common.stage_minutes(
            sorted({design.unit_folder(runs, s, u) for s in per_seed for u in design.UNITS})
        ),
        "environment": next((e for s in per_seed for u in ("short", "medium", "long")
                             if (e := stage_summary(runs, s, u, f"eval_{u}").get("environment"))), None),
        "command": command,
        "minutes_this_invocation": minutes,
    }  # fmt: skip
    arm = res["earlier_arm"]
    if arm and arm.get("short_gold") and "short" in points:
        # the same seeds' all-pairs runs, run again here: equal to the last digit, or not
        now = short_gold(points["short"])
        arm["short_repeated"] = arm["seeds"] == res["seeds"] and now == arm["short_gold"]
    res["claims"] = judge(res)
    return res


def summarise(done: dict[int, dict]) -> dict:
    """Mean ± sd over seeds of every run's metrics, with the per-seed differences."""
    first = next(iter(done.values()))

    def over_seeds(get) -> dict:
        return {k: common.mean_sd([get(r).get(k) for r in done.values()]) for k in METRICS}

    out = {
        "seeds": list(done),
        "ppo": {c: over_seeds(lambda r, c=c: r["ppo"].get(c, {})) for c in first["ppo"]},
        "rto": over_seeds(lambda r: r["rto"]),
        "sft": over_seeds(lambda r: r["sft"] or {}),
        "equal_kl": [r["equal_kl"] for r in done.values()],
        "equal_kl_fluency": [r.get("equal_kl_fluency") for r in done.values()],
        "same_coef": [r["same_coef"] for r in done.values()],
        "efficiency": [r.get("efficiency", {}).get("share") for r in done.values()],
        "reached_known": [("efficiency" in r) for r in done.values()],
        "ppo_final_rollout": [r.get("efficiency", {}).get("ppo_final") for r in done.values()],
    }
    curves = [r["efficiency"]["curves"] for r in done.values() if "efficiency" in r]
    if curves:
        out["curves"] = {m: mean_curve([c[m] for c in curves]) for m in ("ppo", "rto")}
    return out


def mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    n = min(len(c) for c in curves)
    return [(curves[0][i][0], statistics.fmean(c[i][1] for c in curves)) for i in range(n)]


# --------------------------------------------------------------------------- verdicts


def slope(xy: list[tuple[float, float]]) -> float:
    """Least-squares slope of y on x."""
    mx, my = statistics.fmean(x for x, _ in xy), statistics.fmean(y for _, y in xy)
    return sum((x - mx) * (y - my) for x, y in xy) / sum((x - mx) ** 2 for x, _ in xy)


def fmt(d: dict) -> str:
    if not d["n"]:
        return "not read"
    return f"{d['mean']:+.3f} ± {d['sd']:.3f} (per seed {values_text(d['values'])})"


def fmt_seeds(values: list) -> str:
    """Mean ± sd over the seeds where a value was read, and every seed's value."""
    d = common.mean_sd([v for v in values if v is not None])
    return (
        "not read"
        if not d["n"]
        else f"{d['mean']:+.3f} ± {d['sd']:.3f} (per seed {values_text(values)})"
    )


def values_text(values: list) -> str:
    return ", ".join("not read" if v is None else f"{v:+.3f}" for v in values)


def seed_verdict(values: list[float], sign: int = 1) -> str:
    """common.verdict on `sign` * values; 'n/a' (cannot tell) with fewer than two seeds."""
    return common.verdict(common.mean_sd([sign * v for v in values])) if len(values) >= 2 else "n/a"


def per_seed_slopes(res: dict, xs: dict[str, object]) -> list[float]:
    """Per seed, the slope of the equal-KL difference over the conditions in xs, whose values are
    x or a function of the condition's summary and the seed's index giving x."""
    points = res["points"]
    slopes = []
    for seed in res["seeds"]:
        xy = []
        for p, x in xs.items():
            if p not in points or seed not in points[p]["seeds"]:
                continue
            j = points[p]["seeds"].index(seed)
            y = points[p]["equal_kl"][j]
            xv = x(points[p], j) if callable(x) else x
            if y is not None and xv is not None:
                xy.append((xv, y))
        if len(xy) >= 2:
            slopes.append(slope(xy))
    return slopes


def delta_text(res: dict, names: dict[str, str]) -> str:
    parts = []
    for p, label in names.items():
        if p in res["points"]:
            vals = res["points"][p]["equal_kl"]
            read = [v for v in vals if v is not None]
            mean = f"{statistics.fmean(read):+.3f}" if read else "not read"
            parts.append(f"{label} {mean} ({values_text(vals)})")
    return "; ".join(parts)


def sft_log2_length(point: dict, j: int) -> float | None:
    v = point["sft"]["length_mean"].get("values") or []
    return math.log2(v[j]) if j < len(v) and v[j] else None


def judge(res: dict) -> list[dict]:
    points = res["points"]
    out = []

    def add(claim_id: str, holds: str, evidence: str) -> None:
        claim = next(c for c in design.CLAIMS if c["id"] == claim_id)
        out.append(
            {"id": claim_id, "claim": claim["claim"], "verdict": holds, "evidence": evidence}
        )

    # a claim is judged where its conditions ran (a report of some units states only theirs)
    if any(p in points for p in LENGTH_POINTS[1:]):
        s = per_seed_slopes(res, {p: sft_log2_length for p in LENGTH_POINTS})
        add("length", seed_verdict(s), f"slope per doubling of length {fmt(common.mean_sd(s))}; RTO - PPO "
            "at equal KL: " + delta_text(res, {p: p for p in LENGTH_POINTS}))  # fmt: skip
    for claim_id, shares in (("rm_noise", design.RM_POINTS), ("rm_noise_same_share", design.RM_SAME_POINTS)):  # fmt: skip
        if not any(p in points for p, sh in shares.items() if sh < 1):
            continue
        s = per_seed_slopes(res, {p: math.log2(share) for p, share in shares.items()})
        labels = {p: f"{'all' if sh == 1 else p.split('_')[-1]} of the pairs" for p, sh in shares.items()}  # fmt: skip
        add(claim_id, seed_verdict(s, -1), f"slope per doubling of the pairs {fmt(common.mean_sd(s))}; "
            "RTO - PPO at equal KL: " + delta_text(res, labels))  # fmt: skip
    check = res.get("oracle_check")
    if "oracle" not in points:
        pass  # not run: no oracle claim to state
    elif why := oracle_refusal(check):
        # the sentence reward of these runs was not (only) the gold reward: no verdict rests on them
        points = {k: v for k, v in points.items() if k != "oracle"}
        add("oracle_credit", "n/a", why)
        add("oracle_judge", "n/a", why)
    else:
        oracle = points["oracle"]["equal_kl"]
        verdict = seed_verdict([v for v in oracle if v is not None])
        fluency = [v for v in points["oracle"]["equal_kl_fluency"] if v is not None]
        fluency_drop = bool(fluency) and statistics.fmean(fluency) < -FLUENCY_DROP
        add("oracle_credit", "weak" if verdict == "yes" and fluency_drop else verdict,
            "RTO - PPO at equal KL, oracle sentence reward: " + fmt_seeds(oracle)
            + "; fluency, RTO - PPO's frontier: " + fmt_seeds(points["oracle"]["equal_kl_fluency"])
            + (" (more than a drop of 0.05: a yes is read as weak)" if fluency_drop else ""))  # fmt: skip
        paired = paired_differences(points.get("short"), points["oracle"])
        add("oracle_judge", seed_verdict(paired),
            f"(RTO - PPO, reward model) - (RTO - PPO, oracle) {fmt(common.mean_sd(paired))}")  # fmt: skip
    add("efficiency", *efficiency_verdict(points))
    return out


def oracle_refusal(check: dict | None) -> str | None:
    """Why no oracle verdict can be read from these runs (None: they can be)."""
    if not check:
        return "the oracle runs logged no reward_fn reward"
    if check["rollouts_with_score"]:
        return (f"{check['rollouts_with_score']} oracle rollouts had a reward-model score in their "
                "reward; the oracle's sentence reward must be the gold reward alone")  # fmt: skip
    if check["max_abs_difference"] > 1e-4:
        return ("the oracle runs' reward_fn reward is not the gold reward (largest difference "
                f"{check['max_abs_difference']:.3g}); check token_reward_design.oracle_spec")  # fmt: skip
    return None


def paired_differences(a: dict | None, b: dict) -> list[float]:
    """Per seed read in both, a's equal-KL difference minus b's."""
    if not a:
        return []
    b_by_seed = dict(zip(b["seeds"], b["equal_kl"]))
    return [x - b_by_seed[s] for s, x in zip(a["seeds"], a["equal_kl"])
            if x is not None and b_by_seed.get(s) is not None]  # fmt: skip


def efficiency_verdict(points: dict) -> tuple[str, str]:
    holds, texts = [], []
    for p, pt in points.items():
        shares = [s for s, known in zip(pt["efficiency"], pt["reached_known"]) if known]
        if not shares:
            continue
        reached = [s for s in shares if s is not None]
        yes = len(reached) == len(shares) and statistics.fmean(reached) <= 0.25
        holds.append((p, yes))
        per = ", ".join("never" if s is None else f"{s:.2f}" for s in shares)
        texts.append(f"{p} {'yes' if yes else 'no'} ({per})")
    if not holds:
        return "n/a", "no RL curves"
    n_yes = sum(y for _, y in holds)
    verdict = "yes" if n_yes == len(holds) else "no" if n_yes == 0 else "partly"
    return verdict, "share of PPO's samples RTO needs, per seed: " + "; ".join(texts)


# --------------------------------------------------------------------------- output


def write(res: dict, results: Path, stem: str) -> None:
    results.mkdir(parents=True, exist_ok=True)
    files = plots(res, results, stem)
    (results / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (results / f"{stem}.md").write_text(markdown(res, files))


def cell(d: dict, digits: int = 3) -> str:
    return (
        "" if not d or d.get("mean") is None else f"{d['mean']:.{digits}f} ± {d['sd']:.{digits}f}"
    )


def markdown(res: dict, files: list[str]) -> str:
    pts = res["points"]
    judged = {c["id"] for c in res["claims"]}
    share_only = not any(p in pts for p in (*LENGTH_POINTS[1:], "oracle"))
    title = (
        "Does RTO's token reward help more when the reward model is noisier? (built-in sentiment "
        "task, reward model on a share of the pairs)"
        if share_only
        else "Where does RTO's token reward pay? (built-in sentiment task)"
    )
    lines = [
        f"# {title}",
        "",
        f"Command: `{res['command']}` (add `--workers 2` to run folders side by side; the runs are "
        "kept, so a rerun skips every finished stage and rebuilds this report).",
        f"Seeds: {res['seeds']}. Every number is the mean ± sd over seeds of a held-out evaluation "
        "(one sampled response per prompt); gold reward = VADER compound score in [-1, 1].",
        common.made_on(res.get("environment")),
        common.minutes_text(res.get("minutes"), "3 pipelines side by side on 2 CPU cores"),
        "",
        "## Claims, written down before the runs that read them, and what the runs say",
        "",
        "| claim | holds here? | evidence |",
        "|---|---|---|",
        *[
            f"| {c['claim']} | {VERDICT_TEXT[c['verdict']]} | {c['evidence']} |"
            for c in res["claims"]
        ],
        "",
        "How each claim is measured and decided (fixed in `CLAIMS` before the runs that read it):",
        "",
        *[
            f"- **{c['id']}**: {c['measure']} *Rule:* {c['rule']}"
            for c in design.CLAIMS
            if c["id"] in judged
        ],
        "",
        *earlier_note(res.get("earlier_arm"), pts),
        *oracle_note(res.get("oracle_check")),
        "## RTO against PPO in every condition",
        "",
        "| condition | SFT gold | PPO gold at KL coefficient 0.1 | RTO gold | RTO KL | RTO - PPO "
        "at equal KL | RTO - PPO, same KL coefficient | fluency, RTO - PPO at equal KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    coef = str(design.recipe_kl_coef())
    for p, pt in pts.items():
        lines.append(
            f"| {p} | {cell(pt['sft']['gold_reward_mean'])} | "
            f"{cell(pt['ppo'].get(coef, {}).get('gold_reward_mean', {}))} | "
            f"{cell(pt['rto']['gold_reward_mean'])} | {cell(pt['rto']['kl_mean'], 2)} | "
            f"{fmt_seeds(pt['equal_kl'])} | {fmt_seeds(pt['same_coef'])} | "
            f"{fmt_seeds(pt['equal_kl_fluency'])} |"
        )
    lines += ["", "Every run (mean ± sd over seeds):", "",
              "| condition | run | gold reward | KL to SFT | fluency | length |", "|---|---|---|---|---|---|"]  # fmt: skip
    for p, pt in pts.items():
        runs = [("sft", pt["sft"])] + [(f"ppo kl {c}", m) for c, m in pt["ppo"].items()]
        for name, m in runs + [("rto", pt["rto"])]:
            lines.append(f"| {p} | {name} | {cell(m['gold_reward_mean'])} | {cell(m['kl_mean'], 2)} | "
                         f"{cell(m['fluency_rate'])} | {cell(m['length_mean'], 1)} |")  # fmt: skip
    dpo = any("dpo_accuracy" in rm for rm in res["reward_models"].values())
    lines += ["", "## Reward models (and DPO models) on a share of the pairs", "",
              "| share of the pairs | training pairs | reward model's held-out accuracy | gold reward's accuracy (ceiling) |"
              + (" DPO model's training pairs | DPO model's held-out accuracy |" if dpo else ""),
              "|---|---|---|---|" + ("---|---|" if dpo else "")]  # fmt: skip
    for rm in res["reward_models"].values():
        lines.append(f"| {rm['share']:g} | {cell(rm['pairs'], 0)} | {cell(rm['accuracy'])} | "
                     f"{cell(rm['gold_accuracy'])} |"
                     + (f" {cell(rm.get('dpo_pairs'), 0)} | {cell(rm.get('dpo_accuracy'))} |" if dpo else ""))  # fmt: skip
    lines += ["", "## Sample efficiency (rollout gold reward against RL samples)", "",
              "| condition | PPO's final rollout gold | share of PPO's samples RTO needs, per seed |",
              "|---|---|---|"]  # fmt: skip
    for p, pt in pts.items():
        shares = [s for s, k in zip(pt["efficiency"], pt["reached_known"]) if k]
        finals = common.mean_sd([v for v in pt["ppo_final_rollout"] if v is not None])
        lines.append(f"| {p} | {cell(finals)} | "
                     f"{', '.join('never' if s is None else f'{s:.2f}' for s in shares)} |")  # fmt: skip
    lines += ["", *[f"![{f}]({f})\n" for f in files]]
    return "\n".join(lines)


def earlier_note(arm: dict | None, pts: dict) -> list[str]:
    """The earlier arm (DPO model on all the pairs, made with earlier recipes), labelled, beside
    this run's two arms: per share, RTO - PPO at equal KL per seed."""
    if not arm:
        return []
    rows = []
    rerun = any(p in pts for p, sh in design.RM_POINTS.items() if sh < 1)  # unit rm_data ran here
    for p, share in design.RM_POINTS.items():
        same = next((q for q, sh in design.RM_SAME_POINTS.items() if sh == share), None)
        cols = [fmt_seeds(arm["equal_kl"][p]) if p in arm["equal_kl"] else "",
                (fmt_seeds(pts[p]["equal_kl"]) if p in pts else "") if rerun else None,
                fmt_seeds(pts[same]["equal_kl"]) if same in pts else ""]  # fmt: skip
        rows.append(f"| {share:g} | " + " | ".join(c for c in cols if c is not None) + " |")
    verdict = arm.get("verdict") or {}
    repeated = arm.get("short_repeated")
    check = (
        "Its runs on all the pairs are repeated here to the last digit (every PPO and RTO run's "
        "held-out gold reward, per seed), so its other arms stand for today's code too. "
        if repeated
        else "Its runs on all the pairs are NOT repeated here to the last digit: read its arm as "
        "made with other code or settings. "
        if repeated is False
        else ""
    )
    return [
        "## The arms side by side",
        "",
        "RTO - PPO's frontier at RTO's KL (gold reward), mean (per seed), by the share of the pairs "
        f"the reward model saw. *Earlier arm*: `{arm['file']}`, the study's registered arm, its "
        "DPO model trained on all the pairs whatever the reward model's share (its verdict there: "
        f"{verdict.get('verdict', 'n/a')}). {check}"
        + ("*DPO on all pairs, run here*: that design again (unit rm_data); " if rerun else "")
        + "*DPO on the same share*: unit rm_same, where RTO has no more preference data than PPO. "
        "At share 1 the arms are the same runs.",
        "",
        "| share | earlier arm (DPO on all pairs) |"
        + (" DPO on all pairs, run here |" if rerun else "")
        + " DPO on the same share |",
        "|---|---|---|" + ("---|" if rerun else ""),
        *rows,
        "",
    ]


def oracle_note(check: dict | None) -> list[str]:
    """What the oracle control asks, and the check that its runs were what they claim to be."""
    if not check:
        return []
    weights = ", ".join(f"{w:g}" for w in check["weights"])
    return [
        "With the oracle the gold reward is both the sentence reward and the judge, for PPO and RTO "
        "alike: its claims ask whether the token reward helps optimise a given sentence reward at "
        "equal KL (credit assignment), not whether either method generalises to a judge it did not "
        "train on (the main comparisons, where the reward model is a noisy stand-in for the gold "
        f"reward). Checked in the oracle runs' logs: {check['rollouts']} rollouts, weight of the gold "
        f"reward {weights}, largest difference between the logged reward_fn reward / weight and "
        f"the gold reward {check['max_abs_difference']:.2g}, rollouts with a reward-model score in "
        f"their reward: {check['rollouts_with_score']}.",
        "",
    ]


def plots(res: dict, out: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = res["points"]
    colors = {"ppo": "#4c72b0", "rto": "#dd8452"}
    files = []
    rows = max(1, math.ceil(len(pts) / 4))
    fig, axes = plt.subplots(rows, 4, figsize=(17, 3.75 * rows), squeeze=False)
    for ax, (p, pt) in zip(axes.flat, pts.items()):
        for m in ("ppo", "rto"):
            if pt.get("curves"):
                xs, ys = zip(*pt["curves"][m])
                ax.plot(xs, ys, color=colors[m], label=m.upper())
        ax.set_title(p)
        ax.set_xlabel("RL samples")
        ax.set_ylabel("rollout gold reward (trailing mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(pts) :]:
        ax.axis("off")
    fig.suptitle(
        "gold reward against RL samples (mean over seeds; PPO and RTO at KL coefficient 0.1)"
    )
    fig.tight_layout()
    files.append(save(fig, out, f"{stem}_samples.png"))

    fig, axes = plt.subplots(rows, 4, figsize=(17, 3.75 * rows), squeeze=False)
    for ax, (p, pt) in zip(axes.flat, pts.items()):
        front = sorted((m["kl_mean"]["mean"], m["gold_reward_mean"]["mean"], c) for c, m in pt["ppo"].items()
                       if m["kl_mean"]["mean"] is not None)  # fmt: skip
        if front:
            ax.plot(
                [f[0] for f in front],
                [f[1] for f in front],
                "o-",
                color=colors["ppo"],
                label="PPO (KL coefficients)",
            )
            for x, y, c in front:
                ax.annotate(
                    c, (x, y), fontsize=7, textcoords="offset points", xytext=(-4, 4), ha="right"
                )
        for m in pt["ppo"].values():
            ax.plot(
                m["kl_mean"].get("values", []),
                m["gold_reward_mean"].get("values", []),
                ".",
                color=colors["ppo"],
                alpha=0.3,
            )
        r = pt["rto"]
        ax.plot(
            r["kl_mean"].get("values", []),
            r["gold_reward_mean"].get("values", []),
            ".",
            color=colors["rto"],
            alpha=0.4,
        )
        ax.plot(
            [r["kl_mean"]["mean"]],
            [r["gold_reward_mean"]["mean"]],
            "*",
            ms=12,
            color=colors["rto"],
            label="RTO",
        )
        ax.set_title(p)
        ax.set_xlabel("KL to SFT")
        ax.set_ylabel("held-out gold reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)  # fmt: skip
    for ax in list(axes.flat)[len(pts) :]:
        ax.axis("off")
    fig.suptitle("gold reward against KL (large marks: mean over seeds; small: each seed)")
    fig.tight_layout()
    files.append(save(fig, out, f"{stem}_kl.png"))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    if any(p in pts for p in LENGTH_POINTS[1:]):
        delta_panel(axes[0], res, {p: (lambda pt, j: 2 ** sft_log2_length(pt, j) if sft_log2_length(pt, j) else None)
                                   for p in LENGTH_POINTS}, "SFT mean response length (tokens)")  # fmt: skip
    else:
        axes[0].axis("off")  # one length only
    share_axis = "share of the pairs the reward model saw"
    delta_panel(axes[1], res, dict(design.RM_POINTS), share_axis, "#dd8452", "DPO on all pairs")
    if any(p in pts for p in design.RM_SAME_POINTS if p != "short"):
        delta_panel(axes[1], res, dict(design.RM_SAME_POINTS), share_axis, "#55a868",
                    "DPO on the same share")  # fmt: skip
    if "oracle" in pts:
        vals = [v for v in pts["oracle"]["equal_kl"] if v is not None]
        axes[1].plot([2.0] * len(vals), vals, "s", color="gray", alpha=0.5)
        if vals:
            axes[1].plot(
                [2.0],
                [statistics.fmean(vals)],
                "s",
                ms=10,
                color="black",
                label="oracle sentence reward",
            )
            axes[1].legend(fontsize=8)  # fmt: skip
    fig.suptitle("RTO - PPO at equal KL (thin: each seed; thick: mean)")
    fig.tight_layout()
    files.append(save(fig, out, f"{stem}_delta.png"))
    return files


def delta_panel(
    ax, res: dict, xs: dict, xlabel: str, color: str = "#dd8452", label: str | None = None
) -> None:
    pts = res["points"]
    for seed in res["seeds"]:
        line = []
        for p, x in xs.items():
            if p in pts and seed in pts[p]["seeds"]:
                j = pts[p]["seeds"].index(seed)
                xv = x(pts[p], j) if callable(x) else x
                if xv is not None and pts[p]["equal_kl"][j] is not None:
                    line.append((xv, pts[p]["equal_kl"][j]))
        if line:
            ax.plot(*zip(*sorted(line)), "o-", alpha=0.35, color=color)
    means = []
    for p, x in xs.items():
        if p in pts:
            vals = [v for v in pts[p]["equal_kl"] if v is not None]
            xv = [x(pts[p], j) if callable(x) else x for j in range(len(pts[p]["seeds"]))]
            xv = [v for v in xv if v is not None]
            if vals and xv:
                means.append((statistics.fmean(xv), statistics.fmean(vals)))
    if means:
        ax.plot(*zip(*sorted(means)), "o-", lw=3, color=color, label=label)
        if label:
            ax.legend(fontsize=8)
    ax.axhline(0, color="gray", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("RTO - PPO frontier (gold reward)")
    ax.grid(alpha=0.3)


def save(fig, out: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name
