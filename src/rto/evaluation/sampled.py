"""Metrics of sampled responses to held-out prompts: gold reward, fluency, length, truncation,
and, when the models are given, KL to the reference and the reward model's score.

Used by every stage that reports how a policy behaves (SFT, DPO, RL's periodic evaluation and
`rto eval`), so the numbers mean the same thing everywhere.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from rto.data.tokenize import load_prompts
from rto.engine.distributed import gather_ordered, rank_and_world, share
from rto.files import write_jsonl
from rto.models.forward import PADDED, Layout, response_logprobs, run_op
from rto.models.generate import Generator, HFGenerator, decode_responses, stop_ids
from rto.models.generators import make_generator
from rto.models.seeded import row_seed
from rto.tasks import call_judge, resolve


def load_eval_prompts(
    eval_cfg: Any,
    tokenizer: Any,
    max_prompt_length: int,
    seed: int,
    source: str,
    chat_prompts: bool | str = "auto",
) -> list[dict[str, Any]]:
    examples, _ = load_prompts(
        eval_cfg.prompts, eval_cfg.prompts_split, tokenizer, max_rows=eval_cfg.num_prompts, seed=seed,
        max_prompt_length=max_prompt_length, source=source, chat_prompts=chat_prompts,
    )  # fmt: skip
    return examples


def resolve_judges(eval_cfg: Any) -> None:
    """Import the judges a config names (eval.gold_reward, eval.fluency) before any work, so
    that a typo in them is reported at once, not after training."""
    for spec, kind, key in ((eval_cfg.gold_reward, "gold", "eval.gold_reward"),
                            (eval_cfg.fluency, "fluency", "eval.fluency")):  # fmt: skip
        if spec:
            resolve(spec, kind, key)


def load_eval_inputs(cfg: Any, tokenizer: Any, source: str) -> list[dict[str, Any]] | None:
    """Before training: the judges and the held-out prompts sampled after it (None without
    eval.prompts), so that a typo in them is reported before any work."""
    resolve_judges(cfg.eval)
    if not cfg.eval.prompts:
        return None
    return load_eval_prompts(
        cfg.eval, tokenizer, cfg.data.max_prompt_length, cfg.seed, source, cfg.data.chat_prompts
    )


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


def _mean_sem(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    sem = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return mean, sem


def summarise(records: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {
        "length_mean": statistics.fmean(r["length"] for r in records),
        "truncated_share": statistics.fmean(float(r["truncated"]) for r in records),
    }
    for key, name in (("gold_reward", "gold_reward"), ("kl", "kl"), ("rm_score", "rm_score")):
        if records and key in records[0]:
            out[f"{name}_mean"], out[f"{name}_sem"] = _mean_sem([r[key] for r in records])
    if records and "fluent" in records[0]:
        out["fluency_rate"] = statistics.fmean(float(r["fluent"]) for r in records)
    return out


@torch.no_grad()
def sampled_metrics(
    model: Any,
    tokenizer: Any,
    prompts: list[dict[str, Any]],
    eval_cfg: Any,
    gen_cfg: Any,
    *,
    device: Any,
    seed: int,
    ref: Any | None = None,
    reward_model: Any | None = None,
    generator: Generator | None = None,
    passes: Layout = PADDED,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, records): one sampled response per held-out prompt, judged.

    With several processes each one samples and judges its share of the prompts, and every
    process gets all records back in prompt order. Response i is sampled with its own seed
    (seed, i), so the records do not depend on the number of processes or the batch size.
    KL (with `ref`) is the sum over response tokens of log pi(y_h) - log pi_ref(y_h), the
    standard Monte-Carlo estimate of KL(pi || pi_ref) for one response. `generator` samples
    (with `model`'s weights; default: transformers' generate on `model`); `model` is the policy
    the KL reads, in forward passes laid out by `passes`."""
    rank, world = rank_and_world()
    mine = share(len(prompts), rank, world)
    eos = stop_ids(tokenizer, model)
    if generator is None:
        generator = HFGenerator(gen_cfg, tokenizer=tokenizer, eos=eos, device=device, model=model)
    records: list[dict[str, Any]] = []
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:  # evaluation must not disturb the training run's random stream
        for start in range(mine.start, mine.stop, gen_cfg.batch_size):
            positions = range(start, min(start + gen_cfg.batch_size, mine.stop))
            chunk = [prompts[i] for i in positions]
            s = generator.sample(
                [p["prompt_ids"] for p in chunk], [row_seed(seed, i) for i in positions]
            )
            texts = decode_responses(tokenizer, s, eos)
            extra: dict[str, list[float]] = {}
            if ref is not None:
                args = (s.prompt_ids, s.prompt_mask, s.response_ids, s.response_mask)
                kl = (
                    run_op(model, response_logprobs, *args, layout=passes)[0]
                    - run_op(ref, response_logprobs, *args, layout=passes)[0]
                )
                extra["kl"] = kl.sum(1).tolist()
            if reward_model is not None:  # a models.reward_model.RewardModel
                values = [p.get("prompt_value", p["prompt"]) for p in chunk]
                scores = reward_model.score(
                    s.prompt_ids, s.prompt_mask, s.response_ids, s.response_mask, values, texts
                )
                extra["rm_score"] = scores.tolist()
            for j, (i, p) in enumerate(zip(positions, chunk)):
                rec: dict[str, Any] = {"id": p.get("id", i), "prompt": p["prompt"], "response": texts[j],
                                       "length": int(s.response_mask[j].sum()), "truncated": bool(s.truncated[j])}  # fmt: skip
                rec.update({k: v[j] for k, v in extra.items()})
                records.append(rec)
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    gold, fluent = judge(eval_cfg, [r["prompt"] for r in records], [r["response"] for r in records])
    for j, rec in enumerate(records):
        if gold is not None:
            rec["gold_reward"] = gold[j]
        if fluent is not None:
            rec["fluent"] = fluent[j]
    records = gather_ordered(records, list(mine))
    return summarise(records), records


def report_samples(
    cfg: Any, engine: Any, policy: Any, tokenizer: Any, source: str,
    prompts: list[dict[str, Any]] | None = None,
) -> dict[str, float]:  # fmt: skip
    """After training: sample the policy on cfg.eval.prompts (split over the processes; `prompts`
    when `load_eval_inputs` loaded them already), write OUT/samples.jsonl (main process) and
    return the metrics named sample/... for summary.json."""
    from rto.engine.distributed import GenerationWeights

    if not cfg.eval.prompts:
        return {}
    if prompts is None:
        prompts = load_eval_prompts(
            cfg.eval, tokenizer, cfg.data.max_prompt_length, cfg.seed, source, cfg.data.chat_prompts
        )
    with GenerationWeights(engine.accelerator, policy)() as model:
        generator = make_generator(
            cfg.generate, tokenizer=tokenizer, eos=stop_ids(tokenizer, model), device=engine.device,
            model=model, model_cfg=cfg.model, model_path=cfg.model.path,
            max_prompt_length=cfg.data.max_prompt_length,
        )  # fmt: skip
        generator.load_weights(model)
        try:
            metrics, records = sampled_metrics(model, tokenizer, prompts, cfg.eval, cfg.generate,
                                               device=engine.device, seed=cfg.seed, generator=generator)  # fmt: skip
        finally:
            generator.close()
    if engine.is_main:
        write_jsonl(engine.out / "samples.jsonl", records)
    engine.say("[rto] held-out samples: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return {f"sample/{k}": v for k, v in metrics.items()}
