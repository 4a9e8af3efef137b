"""A study's report: the claims with their verdicts and per-seed readings, the held-out table of
every arm, the reward-KL plots with the frontiers, and a README block (one line a claim)."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any

import yaml

VERDICT_TEXT = {"yes": "**yes**", "weak": "*weak*", "no": "**no**", "partly": "*partly*",
                "n/a": "cannot tell"}  # fmt: skip
TABLE = (("gold_reward_mean", "gold reward"), ("kl_mean", "KL to SFT"), ("fluency_rate", "fluency"),
         ("length_mean", "length"), ("win_rate_vs_sft", "win rate vs SFT"), ("rm_score_mean", "RM score"))  # fmt: skip


def number(x: float, signed: bool = True) -> str:  # a share never reached is infinite
    return "never" if math.isinf(x) else f"{x:+.3f}" if signed else f"{x:.3f}"


def reading_text(s: dict[str, Any], seeds: list) -> str:
    """'+0.047 ± 0.009 (sd over 3 seeds; per seed +0.044, +0.039, +0.057)'; the seeds where it
    was not read named once; no sd with one value read (no spread to state)."""
    values, unit, signed = s["values"], s.get("unit", "seed"), s.get("kind") != "share"
    if not s["n"]:
        return f"not read in any of {len(values)} {unit}s"
    labels = seeds if unit == "seed" else range(1, len(values) + 1)
    read = [(label, v) for label, v in zip(labels, values) if v is not None]
    missing = [str(label) for label, v in zip(labels, values) if v is None]
    spread = f" (one {unit}" if s["n"] == 1 else f" ({s['n']} {unit}s" if s["sd"] is None else \
        f" ± {s['sd']:.3f} (sd over {s['n']} {unit}s"  # fmt: skip
    per = ", ".join(number(v, signed) if not missing else f"{unit} {label} {number(v, signed)}" for label, v in read)  # fmt: skip
    text = f"{number(s['mean'], signed)}{spread}; per {unit}: {per})"
    if missing:
        text += f"; not read in {unit}{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    if s.get("note"):
        text += f"; {s['note']}"
    return text


def claim_text(judged: dict[str, Any], seeds: list) -> str:
    """The evidence of one judged claim (its parts, each labelled)."""
    if "parts" in judged:
        return "; ".join(f"{p['label'] + ': ' if p['label'] else ''}{VERDICT_TEXT[p['verdict']]} "
                         f"({claim_text(p, seeds)})" for p in judged["parts"])  # fmt: skip
    text = reading_text(judged["summary"], seeds)
    if judged.get("guard"):
        text += f"; read as weak: the guard's mean is {number(judged['guard']['mean'])}"
    return text


def key_number(judged: dict[str, Any], what: str = "") -> str:
    """The headline number of a claim for the README: its first reading's mean ± se, then what
    it is (`what`, the claim's `number`)."""
    label = ""
    while "parts" in judged:
        judged = judged["parts"][0]
        label = label or judged.get("label", "")
    s, unit = judged["summary"], judged["summary"].get("unit", "seed")
    if not s["n"]:
        return f"{label} not read".strip()
    value = f"{label} {number(s['mean'], s.get('kind') != 'share')}".strip()
    value += f" ± {s['se']:.3f}" if s["se"] is not None else ""
    value += f" {what}" if what else ""
    n = f"{s['n']} {unit}{'s' * (s['n'] > 1)}"
    return f"{value} ({'se over ' if s['se'] is not None else ''}{n})"


def table(per_seed: dict[str, dict], arms: list[str], seeds: list) -> list[str]:
    """The held-out table: per arm each metric's mean ± sd over the seeds that have it."""
    lines = ["| arm | " + " | ".join(label for _, label in TABLE) + " |", "|---" * (len(TABLE) + 1) + "|"]  # fmt: skip
    for arm in arms:
        cells = []
        for key, _ in TABLE:
            vals = [v for s in seeds if (v := per_seed.get(str(s), {}).get(arm, {}).get(key)) is not None]  # fmt: skip
            sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.fmean(vals):.3f}{sd}" if vals else "")
        if any(cells):
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def plots(
    results: dict[str, Any], frontiers: dict[str, list[str]], out: Path, name: str
) -> list[str]:
    """One reward-KL plot per condition (the report stage's), every arm at its mean over seeds."""
    from rto.stages.report import plot

    files = []
    for cond, per_seed in results["per_seed"].items():
        m = {}  # arm -> its means over seeds, as the report stage's plot reads them
        for arm in sorted({a for r in per_seed.values() for a in r}):
            pts = [(r[arm]["gold_reward_mean"], r[arm]["kl_mean"]) for r in per_seed.values()
                   if arm in r and None not in (r[arm].get("gold_reward_mean"), r[arm].get("kl_mean"))]  # fmt: skip
            if pts:
                gold = [g for g, _ in pts]
                sem = statistics.stdev(gold) / len(gold) ** 0.5 if len(gold) > 1 else 0.0
                m[arm] = {"gold_reward_mean": statistics.fmean(gold), "gold_reward_sem": sem,
                          "kl": statistics.fmean(k for _, k in pts)}  # fmt: skip
        tag = "" if cond == "main" else "_" + re.sub(r"[^A-Za-z0-9_\-]", "_", cond)
        title = name + ("" if cond == "main" else f" ({cond})")
        files += plot(m, {}, out, title, prefix=f"{name}{tag}_", frontiers=frontiers) if m else []
    return files


def measure_text(claim: dict[str, Any]) -> str:
    keep = {k: v for k, v in claim.items() if k not in ("id", "claim", "amends")}
    return yaml.safe_dump(keep, default_flow_style=True, sort_keys=False, width=1000).strip()


def markdown(spec: Any, results: dict[str, Any], files: list[str]) -> str:
    seeds = results["seeds"]
    env = results.get("environment") or {}
    packages = env.get("packages") or {}
    where = ", ".join(env.get("gpus") or [f"{env.get('cpu')} ({env.get('cpu_capability')})"]) if env else "not recorded"  # fmt: skip
    versions = ", ".join(f"{k} {packages[k]}" for k in ("torch", "transformers", "accelerate", "peft") if packages.get(k))  # fmt: skip
    lines = [f"# {spec.question or spec.name}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lines += [
        f"Study file: `{results['spec']}`. Command: `{results['command']}` (the runs are kept: a rerun "
        "reuses every finished one; `--report-only` rewrites this page from its json).",
        f"Seeds: {', '.join(map(str, seeds))}. Made on: {where}; Python {env.get('python')}, {versions}. "
        f"CPU time of the runs: {results.get('cpu_hours') or 'not recorded'} CPU-hours. The same "
        "command on the same CPU kind and package versions gives the same numbers; elsewhere float "
        "rounding differs and the numbers move within their spread.",
        "",
        "## Claims",
        "",
        "Every reading is paired by seed (the arms of a seed share its SFT, reward model and DPO "
        "model). A verdict needs two or more seeds read; se = sd / sqrt(seeds read). A reading "
        "outside a frontier's KL range is not read, and the seeds it misses are named.",
        "",
    ]
    for c in results["claims"]:
        lines.append(f"- **{c['claim']}** {VERDICT_TEXT[c['verdict']]}. "
                     + claim_text(c["registered"], seeds))  # fmt: skip
        if c.get("added_by_amendment"):
            lines.append(f"  - Added by an amendment: {c['added_by_amendment'].strip()}")
        if "amended" in c:
            lines.append(f"  - Registered reading: {VERDICT_TEXT[c['registered']['verdict']]}; the "
                         f"amendment's reading: {VERDICT_TEXT[c['amended']['verdict']]} "
                         f"({claim_text(c['amended'], seeds)}). Amendment: {c['amendment_reason']}")  # fmt: skip
    lines += ["", "How each claim is measured and decided (registered before the runs; rules: "
              "`rto study --help`):", ""]  # fmt: skip
    for c in spec.claims:
        lines.append(f"- `{c['id']}`: `{measure_text(c)}`")
    for a in spec.amendments:
        lines += ["", f"Amendment: {a['reason'].strip()}"]
        for c in a.get("claims") or []:
            head = f"amends `{c['amends']}`" if "amends" in c else f"adds `{c['id']}`"
            lines.append(f"- {head}: `{measure_text(c)}`")
    for cond, per_seed in results["per_seed"].items():
        arms = list(spec.all_arms())
        title = "Held-out results" + ("" if cond == "main" else f": {cond}")
        lines += ["", f"## {title}", "", "Mean ± sd over seeds (one sampled response per held-out prompt).", ""]  # fmt: skip
        lines += table(per_seed, arms, seeds)
    lines += ["", *[f"![{f}]({f})\n" for f in files]]
    for note in results.get("notes") or []:
        lines += [f"Note: {note}", ""]
    return "\n".join(lines).rstrip() + "\n"


def readme_block(spec: Any, results: dict[str, Any], page: str) -> str:
    """One line a claim: the question, its verdict, the key number with its spread."""
    lines = [f"- **{spec.question or spec.name}** ([report]({page}); `{results['command']}`)"]
    for c in results["claims"]:
        judged = c.get("amended") if c["verdict"] != c["registered"]["verdict"] else c["registered"]
        lines.append(
            f"  - {c['claim']} {VERDICT_TEXT[c['verdict']]}: {key_number(judged, c.get('number', ''))}"
        )
    return "\n".join(lines)
