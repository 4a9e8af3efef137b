"""`rto eval`: compare policies on held-out prompts.

For each policy, one sampled response per prompt (same prompts, same sampling settings), and:
gold reward (when the task has one), reward-model score (a reward model with its own tokenizer
reads the prompt and response re-rendered with its own chat template), KL to the reference
(summed over the response's tokens), fluency (when the task has a check), response length, distinct-1/2, and win
rates of every policy against every other (by gold reward, or by the reward model), a tie
counting one half. Writes eval.json, generations/<name>.jsonl and a table on the terminal;
optionally exports generations for AlpacaEval 2 and Arena-Hard.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from rto.config.stages import EvalConfig
from rto.engine.distributed import init_distributed
from rto.engine.logger import write_summary
from rto.engine.run import RunFolder
from rto.evaluation.sampled import load_eval_prompts, resolve_judges, sampled_metrics
from rto.files import write_atomic, write_json, write_jsonl
from rto.models.forward import Layout
from rto.models.generate import stop_ids
from rto.models.generators import make_generator
from rto.models.load import check_same_tokenizer, load_causal_lm, load_tokenizer
from rto.models.reward_model import load_reward_model


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all responses (Li et al. 2016)."""
    grams = [
        tuple(words[i : i + n])
        for t in texts
        for words in [t.split()]
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rates(scores: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """rates[a][b] = share of prompts where a's response beats b's (ties count one half)."""
    out: dict[str, dict[str, float]] = {}
    for a, sa in scores.items():
        out[a] = {}
        for b, sb in scores.items():
            if a != b:
                out[a][b] = statistics.fmean(
                    1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(sa, sb)
                )
    return out


def export_alpaca_eval(out: Path, name: str, records: list[dict[str, Any]]) -> None:
    rows = [
        {"instruction": r["prompt"], "output": r["response"], "generator": name, "dataset": "rto"}
        for r in records
    ]
    write_atomic(
        out / "exports" / "alpaca_eval" / f"{name}.json", json.dumps(rows, indent=1) + "\n"
    )


def export_arena_hard(out: Path, name: str, records: list[dict[str, Any]]) -> None:
    now = time.time()
    rows = [
        {
            "question_id": r["id"],
            "answer_id": f"{name}-{r['id']}",
            "model_id": name,
            "choices": [
                {"index": 0, "turns": [{"content": r["response"], "token_len": r["length"]}]}
            ],
            "tstamp": now,
        }
        for r in records
    ]
    write_jsonl(out / "exports" / "arena_hard" / f"{name}.jsonl", rows)


def format_table(methods: dict[str, dict[str, Any]], baseline: str) -> str:
    cols = [("gold_reward_mean", "gold"), ("rm_score_mean", "RM score"), ("kl_mean", "KL"), ("fluency_rate", "fluency"),
            ("length_mean", "length"), ("distinct_2", "distinct-2"), (f"win_rate_vs_{baseline}", f"win vs {baseline}")]  # fmt: skip
    cols = [(k, h) for k, h in cols if any(k in m for m in methods.values())]
    header = "| method | " + " | ".join(h for _, h in cols) + " |"
    lines = [header, "|" + "---|" * (len(cols) + 1)]
    for name, m in methods.items():
        cells = []
        for k, _ in cols:
            v = m.get(k)
            if v is None:
                cells.append("")
            elif k == "gold_reward_mean" and "gold_reward_sem" in m:
                cells.append(f"{v:.3f} ± {m['gold_reward_sem']:.3f}")
            else:
                cells.append(f"{v:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(cfg: EvalConfig, folder: RunFolder) -> dict[str, Any]:
    """Each process samples and judges its share of the prompts (seeded per prompt, so the
    generations do not depend on the number of processes); the main process writes, and only
    once every policy is judged."""
    dist = init_distributed()
    main = dist.is_main_process
    began = time.time()
    device = dist.device
    policies = cfg.named_policies()
    loading = cfg.model.model_section()  # how every model is loaded (each has its own path)
    first_name, first_path = policies[0]
    tokenizer = load_tokenizer(loading, first_path, f"policy {first_name}")
    resolve_judges(cfg.eval)
    for name, path in policies[1:] + ([("reference", cfg.ref_model)] if cfg.ref_model else []):
        role = f"policy {name}" if name != "reference" else "reference model"
        check_same_tokenizer(
            tokenizer,
            f"policy {first_name}",
            load_tokenizer(loading, path, role),
            role,
        )
    prompts = load_eval_prompts(
        cfg.eval, tokenizer, cfg.data.max_prompt_length, cfg.seed, first_path, cfg.data.chat_prompts
    )
    ref = (
        load_causal_lm(loading, path=cfg.ref_model, trainable=False, role="reference model").to(
            device
        )
        if cfg.ref_model
        else None
    )
    rm = None
    if cfg.reward_model:  # may have its own tokenizer: it then reads re-rendered text
        rm = load_reward_model(loading, cfg.reward_model, tokenizer, chat_prompts=cfg.data.chat_prompts,
                               device=device)  # fmt: skip
        rm.check_prompts([p["prompt_value"] for p in prompts])
        if main:
            print("[rto] " + rm.describe(), flush=True)

    methods: dict[str, dict[str, Any]] = {}
    all_records: dict[str, list[dict[str, Any]]] = {}
    for name, path in policies:
        policy = load_causal_lm(loading, path=path, trainable=False, role=f"policy {name}")
        policy = policy.to(device)
        generator = make_generator(cfg.generate, tokenizer=tokenizer, eos=stop_ids(tokenizer, policy), device=device,
                                   model=policy, model_cfg=loading, model_path=path,
                                   max_prompt_length=cfg.data.max_prompt_length)  # fmt: skip
        try:
            metrics, records = sampled_metrics(policy, tokenizer, prompts, cfg.eval, cfg.generate, device=device,
                                               seed=cfg.seed, ref=ref, reward_model=rm, generator=generator,
                                               passes=Layout.of(loading))  # fmt: skip
        finally:
            generator.close()
        texts = [r["response"] for r in records]
        metrics.update(
            {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2), "path": path}
        )
        methods[name], all_records[name] = metrics, records
        if main:
            print(
                f"[rto] eval {name}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)),
                flush=True,
            )
        del policy

    judge = cfg.win_rate_by
    if judge == "auto":
        judge = "gold" if cfg.eval.gold_reward else "reward_model"
    key = "gold_reward" if judge == "gold" else "rm_score"
    rates: dict[str, dict[str, float]] = {}
    if all(key in recs[0] for recs in all_records.values() if recs):
        rates = win_rates({n: [r[key] for r in recs] for n, recs in all_records.items()})
    baseline = cfg.baseline or first_name
    for name in methods:
        if name != baseline and rates:
            methods[name][f"win_rate_vs_{baseline}"] = rates[name][baseline]
    table = format_table(methods, baseline)
    result = {
        "methods": methods,
        "win_rates": rates,
        "win_rate_by": judge,
        "baseline": baseline,
        "prompts": len(prompts),
    }
    out = folder.begin(is_main=main)  # every policy is judged: only now is an old run replaced
    if main:
        for name, records in all_records.items():
            write_jsonl(out / "generations" / f"{name}.jsonl", records)
            if "alpaca_eval" in cfg.export:
                export_alpaca_eval(out, name, records)
            if "arena_hard" in cfg.export:
                export_arena_hard(out, name, records)
    summary = {"stage": "eval", **result, "seconds": round(time.time() - began, 1)}
    if main:
        print(table, flush=True)
        write_json(out / "eval.json", result)
        write_summary(out, summary)
    dist.wait_for_everyone()
    return summary
