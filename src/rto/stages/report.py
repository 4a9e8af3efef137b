"""`rto report`: results.json, results.md and plots from an `rto eval` run and RL curves.

results.json: {"methods": {NAME: {gold_reward_mean, gold_reward_sem, kl, fluency_rate,
length_mean, win_rate_vs_sft, ...}}, "config": <the resolved pipeline config>,
"environment": <where it ran: CPU/GPU, Python and package versions>}
Plots: gold reward against RL samples for each RL run (held-out evaluations during training),
and gold reward against KL for every method (with the RL runs' paths through that plane).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rto.config import core
from rto.config.stages import ReportConfig
from rto.engine.environment import environment
from rto.engine.logger import write_summary
from rto.engine.run import RunFolder
from rto.errors import DataError
from rto.files import read_json, write_atomic, write_json
from rto.stages.eval import format_table

KEYS = ("gold_reward_mean", "gold_reward_sem", "kl", "fluency_rate", "length_mean")


def read_curve(path: Path) -> list[dict[str, float]]:
    rows = []
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise DataError(
            f"config key 'curves': {path} has no metrics.jsonl; give the output folder of an `rto rl` run"
        )
    for number, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"file {metrics}, line {number}: not valid JSON") from None
        if "eval/gold_reward_mean" in r:
            rows.append({"samples": r.get("samples", 0), "gold": r["eval/gold_reward_mean"],
                         "sem": r.get("eval/gold_reward_sem", 0.0), "kl": r.get("eval/kl_mean", float("nan")),
                         "fluency": r.get("eval/fluency_rate", float("nan"))})  # fmt: skip
    return rows


def method_rows(eval_result: dict[str, Any], baseline: str) -> dict[str, dict[str, Any]]:
    out = {}
    for name, m in eval_result["methods"].items():
        row = {k: m.get(k if k != "kl" else "kl_mean") for k in KEYS}
        row["kl_sem"] = m.get("kl_sem")
        row["win_rate_vs_" + baseline] = m.get(
            f"win_rate_vs_{baseline}", 0.5 if name == baseline else None
        )
        for extra in ("rm_score_mean", "distinct_2", "truncated_share"):
            if extra in m:
                row[extra] = m[extra]
        out[name] = row
    return out


def plot(
    methods: dict[str, dict[str, Any]],
    curves: dict[str, list[dict[str, float]]],
    out: Path,
    title: str,
    prefix: str = "",
    frontiers: dict[str, list[str]] | None = None,
) -> list[str]:
    """gold_vs_samples.png (the RL curves, when any) and gold_vs_kl.png (every method; each of
    `frontiers`, a list of methods, drawn as a line through them in order of KL), the file names
    after `prefix`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, (name, rows) in enumerate(curves.items()):
            x = [r["samples"] for r in rows]
            y = [r["gold"] for r in rows]
            e = [1.96 * r["sem"] for r in rows]
            ax.plot(x, y, marker="o", color=colors[i % len(colors)], label=name)
            ax.fill_between(
                x,
                [a - b for a, b in zip(y, e)],
                [a + b for a, b in zip(y, e)],
                color=colors[i % len(colors)],
                alpha=0.15,
            )
        for name, style in (("sft", ":"), ("dpo", "--")):
            if name in methods and methods[name]["gold_reward_mean"] is not None:
                ax.axhline(
                    methods[name]["gold_reward_mean"],
                    color="gray",
                    linestyle=style,
                    label=f"{name} (eval stage)",
                )
        ax.set_xlabel("RL samples (responses generated)")
        ax.set_ylabel("held-out gold reward (mean, 95% CI)")
        ax.set_title(f"{title}: gold reward during RL")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{prefix}gold_vs_samples.png", dpi=120)
        plt.close(fig)
        files.append(f"{prefix}gold_vs_samples.png")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, rows in enumerate(curves.values()):
        ax.plot(
            [r["kl"] for r in rows],
            [r["gold"] for r in rows],
            color=colors[i % len(colors)],
            alpha=0.5,
            linewidth=1,
        )
    for i, (label, names) in enumerate((frontiers or {}).items()):
        pts = sorted((methods[n]["kl"], methods[n]["gold_reward_mean"]) for n in names
                     if n in methods and None not in (methods[n]["kl"], methods[n]["gold_reward_mean"]))  # fmt: skip
        if pts:
            ax.plot(*zip(*pts), color=colors[(i + len(curves)) % len(colors)], alpha=0.6,
                    label=f"{label} frontier")  # fmt: skip
    if frontiers:
        ax.legend(fontsize=8)
    for k, (name, m) in enumerate(methods.items()):
        if m["gold_reward_mean"] is None or m["kl"] is None:
            continue
        color = colors[list(curves).index(name) % len(colors)] if name in curves else "black"
        ax.errorbar(
            m["kl"],
            m["gold_reward_mean"],
            yerr=1.96 * (m["gold_reward_sem"] or 0),
            fmt="o",
            color=color,
            capsize=3,
        )
        ax.annotate(  # alternate label sides so that neighbouring methods stay readable
            name, (m["kl"], m["gold_reward_mean"]), textcoords="offset points",
            xytext=(8, 6) if k % 2 == 0 else (8, -14),
        )  # fmt: skip
    ax.set_xlabel("KL to the SFT policy (per response, summed over tokens)")
    ax.set_ylabel("held-out gold reward (mean, 95% CI)")
    ax.set_title(f"{title}: reward against KL")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}gold_vs_kl.png", dpi=120)
    plt.close(fig)
    files.append(f"{prefix}gold_vs_kl.png")
    return files


def markdown(
    title: str,
    methods: dict[str, dict[str, Any]],
    baseline: str,
    plots: list[str],
    eval_result: dict[str, Any],
) -> str:
    table_input = {n: {**m, "kl_mean": m["kl"]} for n, m in methods.items()}
    lines = [f"# {title}", "", f"{eval_result['prompts']} held-out prompts, one sampled response each; "
             f"win rates judged by the {eval_result['win_rate_by'].replace('_', ' ')}; ± is one standard error.", "",
             format_table(table_input, baseline), ""]  # fmt: skip
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    return "\n".join(lines)


def run(cfg: ReportConfig, folder: RunFolder) -> dict[str, Any]:
    eval_file = Path(cfg.eval) / "eval.json"
    if not eval_file.is_file():
        raise DataError(
            f"config key 'eval': {eval_file} does not exist; give the output folder of an `rto eval` run"
        )
    try:
        eval_result = read_json(eval_file)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"file {eval_file} is not valid JSON ({exc}); rerun `rto eval`") from None
    if not isinstance(eval_result, dict) or "methods" not in eval_result:
        raise DataError(f"file {eval_file} has no 'methods'; is it the eval.json of `rto eval`?")
    methods = method_rows(eval_result, cfg.baseline)
    curves = {e.split("=", 1)[0]: read_curve(Path(e.split("=", 1)[1])) for e in cfg.curves}
    recipe = Path(cfg.pipeline_config or folder.path.parent / "pipeline.yaml")
    if cfg.pipeline_config or recipe.is_file():
        core.load_yaml(recipe)  # checked before the run begins
    out = folder.begin()  # under `rto pipeline`, this may write the recipe being run
    config = core.load_yaml(recipe) if recipe.is_file() else None
    plots = plot(methods, curves, out, cfg.title)
    result = {"methods": methods, "curves": curves, "config": config, "environment": environment()}
    write_json(out / "results.json", result)
    write_atomic(out / "results.md", markdown(cfg.title, methods, cfg.baseline, plots, eval_result))
    print(
        format_table({n: {**m, "kl_mean": m["kl"]} for n, m in methods.items()}, cfg.baseline),
        flush=True,
    )
    write_summary(out, {"stage": "report", "plots": plots, "methods": list(methods)})
    return result
