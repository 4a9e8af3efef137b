"""Metrics of sampled responses to held-out prompts: gold reward, fluency, length, truncation.

Used by every stage that reports how a policy behaves (SFT, DPO, RL's periodic evaluation, and
`rto eval`), so the numbers mean the same thing everywhere.
"""

from __future__ import annotations

import statistics
from typing import Any

from rto.data.sources import load_rows, subsample
from rto.data.tokenize import build_prompts
from rto.models.generate import sample_texts
from rto.tasks import call_judge, resolve


def load_eval_prompts(eval_cfg: Any, tokenizer: Any, max_prompt_length: int, seed: int, source: str) -> list[dict[str, Any]]:
    rows = subsample(load_rows(eval_cfg.prompts, eval_cfg.prompts_split), eval_cfg.num_prompts, seed)
    examples, _ = build_prompts(rows, tokenizer, max_prompt_length=max_prompt_length, source=source)
    return examples


def judge(
    eval_cfg: Any, prompts: list[str], responses: list[str]
) -> tuple[list[float] | None, list[bool] | None]:
    gold = fluent = None
    if eval_cfg.gold_reward:
        fn = resolve(eval_cfg.gold_reward, "gold", "eval.gold_reward")
        gold = call_judge(fn, prompts, responses, eval_cfg.gold_reward, "gold")
    if eval_cfg.fluency:
        fn = resolve(eval_cfg.fluency, "fluency", "eval.fluency")
        fluent = call_judge(fn, prompts, responses, eval_cfg.fluency, "fluency")
    return gold, fluent


def summarise(gold: list[float] | None, fluent: list[bool] | None, lengths: list[int], truncated: list[bool]) -> dict[str, float]:
    out: dict[str, float] = {
        "length_mean": statistics.fmean(lengths) if lengths else 0.0,
        "truncated_share": statistics.fmean(truncated) if truncated else 0.0,
    }
    if gold:
        out["gold_reward_mean"] = statistics.fmean(gold)
        out["gold_reward_sem"] = statistics.stdev(gold) / len(gold) ** 0.5 if len(gold) > 1 else 0.0
    if fluent:
        out["fluency_rate"] = statistics.fmean(fluent)
    return out


def sampled_metrics(
    model: Any,
    tokenizer: Any,
    prompts: list[dict[str, Any]],
    eval_cfg: Any,
    gen_cfg: Any,
    *,
    device: Any,
    seed: int,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, records): one sampled response per held-out prompt, judged."""
    import torch

    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:  # evaluation must not disturb the training run's random stream
        texts, truncated, lengths = sample_texts(
            model, tokenizer, [p["prompt_ids"] for p in prompts], gen_cfg, device=device, seed=seed
        )
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    prompt_texts = [p["prompt"] for p in prompts]
    gold, fluent = judge(eval_cfg, prompt_texts, texts)
    records = []
    for i, (p, r) in enumerate(zip(prompt_texts, texts)):
        rec: dict[str, Any] = {"prompt": p, "response": r, "length": lengths[i], "truncated": truncated[i]}
        if gold is not None:
            rec["gold_reward"] = gold[i]
        if fluent is not None:
            rec["fluent"] = fluent[i]
        records.append(rec)
    return summarise(gold, fluent, lengths, truncated), records
