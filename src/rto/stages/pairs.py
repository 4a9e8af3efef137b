"""`rto pairs`: preference data from a policy and a gold reward, labelled by a simulated annotator.

For each prompt, k responses are sampled from the policy and scored by the gold reward g; the
chosen pairs are labelled by
  * bradley_terry:  P(a preferred to b) = sigmoid((g_a - g_b) / temperature)  (noisy, like people)
  * deterministic:  the higher g wins (ties skipped or broken at random).
Output: pairs_train.jsonl and pairs_eval.jsonl with rows {prompt, chosen, rejected, chosen_gold,
rejected_gold}: ordinary preference data that `rto rm` and `rto dpo` read like any user's.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
import time
from collections import Counter
from typing import Any

from rto.config.stages import PairsConfig
from rto.data.tokenize import load_prompts
from rto.engine.distributed import gather_ordered, init_distributed, share
from rto.engine.logger import write_summary
from rto.engine.run import RunFolder
from rto.files import write_jsonl
from rto.models.generate import decode_responses, stop_ids
from rto.models.generators import make_generator
from rto.models.load import load_causal_lm, load_tokenizer
from rto.models.seeded import row_seed
from rto.tasks import call_judge, resolve


def choose_pairs(gold: list[float], pairing: str, rng: random.Random) -> list[tuple[int, int]]:
    k = len(gold)
    if pairing == "all" or k == 2:
        return list(itertools.combinations(range(k), 2))
    if pairing == "random":
        return [tuple(rng.sample(range(k), 2))]  # type: ignore[list-item]
    order = sorted(range(k), key=lambda i: gold[i])
    return [(order[-1], order[0])]


def label(
    g_a: float, g_b: float, annotator: str, temperature: float, ties: str, rng: random.Random
) -> bool | None:
    """True if a is preferred, False if b is, None to skip (a tie under skip)."""
    if annotator == "bradley_terry":
        z = (g_a - g_b) / temperature
        p = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
        return rng.random() < p
    if g_a == g_b:
        return None if ties == "skip" else rng.random() < 0.5
    return g_a > g_b


def gold_accuracy(rows: list[dict[str, Any]]) -> float:
    """Share of pairs whose chosen side has the higher gold reward (ties count one half): the
    best accuracy any learned reward can reach on these labels."""
    if not rows:
        return float("nan")
    score = sum(
        1.0
        if r["chosen_gold"] > r["rejected_gold"]
        else 0.5
        if r["chosen_gold"] == r["rejected_gold"]
        else 0.0
        for r in rows
    )
    return score / len(rows)


def pairs_of_prompt(
    prompt: str, texts: list[str], gold: list[float], truncated: list[bool], cfg: PairsConfig,
    rng: random.Random,
) -> tuple[list[dict[str, Any]], Counter]:  # fmt: skip
    """The labelled pairs made from one prompt's k responses, and what was skipped."""
    skipped: Counter = Counter()
    made = []
    for a, b in choose_pairs(gold, cfg.pairing, rng):
        if texts[a] == texts[b]:
            skipped["identical responses"] += 1
            continue
        if not texts[a].strip() or not texts[b].strip():
            skipped["empty response"] += 1
            continue
        if cfg.drop_truncated and (truncated[a] or truncated[b]):
            skipped["truncated response"] += 1
            continue
        a_wins = label(gold[a], gold[b], cfg.annotator, cfg.temperature, cfg.ties, rng)
        if a_wins is None:
            skipped["tie"] += 1
            continue
        w, l_ = (a, b) if a_wins else (b, a)
        made.append({"prompt": prompt, "chosen": texts[w], "rejected": texts[l_],
                     "chosen_gold": gold[w], "rejected_gold": gold[l_]})  # fmt: skip
    return made, skipped


def run(cfg: PairsConfig, folder: RunFolder) -> dict[str, Any]:
    """Each process samples, judges and labels its share of the prompts; every prompt's
    responses and labels come from seeds of its own (run seed, prompt index), so the pairs do
    not depend on the number of processes. The main process writes the files, and only once
    every response is judged."""
    dist = init_distributed()
    began = time.time()
    device = dist.device
    judge = resolve(cfg.gold_reward, "gold", "gold_reward")
    tokenizer = load_tokenizer(cfg.model)
    prompts, report = load_prompts(
        cfg.data.path, cfg.data.split, tokenizer, max_rows=cfg.data.max_rows, seed=cfg.seed,
        max_prompt_length=cfg.data.max_prompt_length, source=cfg.model.path, chat_prompts=cfg.data.chat_prompts,
        fraction=cfg.data.train_fraction,
    )  # fmt: skip
    model = load_causal_lm(cfg.model, trainable=False).to(device)
    eos = stop_ids(tokenizer, model)
    generator = make_generator(cfg.generate, tokenizer=tokenizer, eos=eos, device=device, model=model,
                               model_cfg=cfg.model, model_path=cfg.model.path,
                               max_prompt_length=cfg.data.max_prompt_length)  # fmt: skip
    k = cfg.num_samples
    per_call = max(1, cfg.generate.batch_size // k)
    mine = share(len(prompts), dist.process_index, dist.num_processes)
    results: list[tuple[list[dict[str, Any]], list[float], Counter]] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), disable=not cfg.log.progress or not dist.is_main_process, desc="pairs",
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)  # fmt: skip
    for start in range(mine.start, mine.stop, per_call):
        positions = range(start, min(start + per_call, mine.stop))
        chunk = [prompts[i] for i in positions]
        s = generator.sample([p["prompt_ids"] for p in chunk for _ in range(k)],
                             [row_seed(cfg.seed, i, j) for i in positions for j in range(k)])  # fmt: skip
        texts = decode_responses(tokenizer, s, eos)
        prompt_texts = [p["prompt"] for p in chunk for _ in range(k)]
        gold = call_judge(judge, prompt_texts, texts, cfg.gold_reward, "gold")
        truncated = s.truncated.tolist()
        for j, (i, p) in enumerate(zip(positions, chunk)):
            own = slice(j * k, (j + 1) * k)
            rng = random.Random(row_seed(cfg.seed, i, -1))  # this prompt's annotator
            made, skipped = pairs_of_prompt(
                p["prompt_value"], texts[own], gold[own], truncated[own], cfg, rng
            )
            results.append((made, gold[own], skipped))
        bar.update(len(chunk))
    bar.close()
    generator.close()
    results = gather_ordered(results, list(mine))
    pairs_by_prompt = [made for made, _, _ in results]
    gold_all = [g for _, gold, _ in results for g in gold]
    skipped = {"identical responses": 0, "empty response": 0, "truncated response": 0, "tie": 0}
    for _, _, counts in results:
        for reason, n in counts.items():
            skipped[reason] += n

    order = list(range(len(pairs_by_prompt)))
    random.Random(cfg.seed + 1).shuffle(order)
    n_eval = int(round(len(order) * cfg.data.eval_fraction))
    eval_ids = set(order[:n_eval])
    train_rows = [r for i, made in enumerate(pairs_by_prompt) if i not in eval_ids for r in made]
    eval_rows = [r for i, made in enumerate(pairs_by_prompt) if i in eval_ids for r in made]
    if not train_rows:
        from rto.errors import RtoError

        raise RtoError(
            f"no preference pairs could be made ({skipped}); sample more responses or use more prompts"
        )
    out = folder.begin(
        is_main=dist.is_main_process
    )  # every response is judged: only now is an old run replaced
    if dist.is_main_process:
        write_jsonl(out / "pairs_train.jsonl", train_rows)
        write_jsonl(out / "pairs_eval.jsonl", eval_rows)
    labelled = train_rows + eval_rows
    summary = {
        "stage": "pairs",
        "prompts": len(prompts),
        "pairs_train": len(train_rows),
        "pairs_eval": len(eval_rows),
        "skipped": skipped,
        "prompt_data": report.to_dict(),
        "samples_gold_reward_mean": sum(gold_all) / len(gold_all),
        "gold_accuracy_train": gold_accuracy(train_rows),
        "gold_accuracy_eval": gold_accuracy(eval_rows),
        "label_agrees_with_gold": gold_accuracy(labelled),
        "seconds": round(time.time() - began, 1),
    }
    if dist.is_main_process:
        print(
            f"[rto] pairs: {len(train_rows)} train + {len(eval_rows)} held-out pairs from {len(prompts)} prompts; "
            f"skipped {skipped}; labels agree with the gold reward on {summary['label_agrees_with_gold']:.3f}",
            flush=True,
        )
        write_summary(out, summary)
    dist.wait_for_everyone()
    return summary
