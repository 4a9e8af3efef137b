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
from typing import Any

import torch

from rto.config.stages import PairsConfig
from rto.data.tokenize import load_prompts
from rto.engine.files import write_jsonl
from rto.engine.logger import write_summary
from rto.engine.run import RunFolder
from rto.models.generate import decode_responses, sample, stop_ids
from rto.models.load import load_causal_lm, load_tokenizer
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


def run(cfg: PairsConfig) -> dict[str, Any]:
    from accelerate import PartialState

    folder = RunFolder.check(cfg, "pairs")  # writes nothing; the folder changes at the end
    began = time.time()
    device = PartialState().device
    judge = resolve(cfg.gold_reward, "gold", "gold_reward")
    tokenizer = load_tokenizer(cfg.model)
    prompts, report = load_prompts(
        cfg.data.path, cfg.data.split, tokenizer, max_rows=cfg.data.max_rows, seed=cfg.seed,
        max_prompt_length=cfg.data.max_prompt_length, source=cfg.model.path, chat_prompts=cfg.data.chat_prompts,
    )  # fmt: skip
    model = load_causal_lm(cfg.model, trainable=False).to(device)
    eos = stop_ids(tokenizer, model)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    k = cfg.num_samples
    per_call = max(1, cfg.generate.batch_size // k)
    skipped = {"identical responses": 0, "empty response": 0, "truncated response": 0, "tie": 0}
    pairs_by_prompt: list[list[dict[str, Any]]] = []
    gold_all: list[float] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), disable=not cfg.log.progress, desc="pairs", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)  # fmt: skip
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start : start + per_call]
        s = sample(
            model, [p["prompt_ids"] for p in chunk for _ in range(k)], pad_id=tokenizer.pad_token_id, eos=eos,
            max_new_tokens=cfg.generate.max_new_tokens, temperature=cfg.generate.temperature,
            top_p=cfg.generate.top_p, top_k=cfg.generate.top_k, device=device,
        )  # fmt: skip
        texts = decode_responses(tokenizer, s, eos)
        prompt_texts = [p["prompt"] for p in chunk for _ in range(k)]
        gold = call_judge(judge, prompt_texts, texts, cfg.gold_reward, "gold")
        gold_all += gold
        truncated = s.truncated.tolist()
        for j, p in enumerate(chunk):
            idx = range(j * k, (j + 1) * k)
            g = [gold[i] for i in idx]
            made = []
            for a, b in choose_pairs(g, cfg.pairing, rng):
                ia, ib = idx[a], idx[b]
                if texts[ia] == texts[ib]:
                    skipped["identical responses"] += 1
                    continue
                if not texts[ia].strip() or not texts[ib].strip():
                    skipped["empty response"] += 1
                    continue
                if cfg.drop_truncated and (truncated[ia] or truncated[ib]):
                    skipped["truncated response"] += 1
                    continue
                a_wins = label(gold[ia], gold[ib], cfg.annotator, cfg.temperature, cfg.ties, rng)
                if a_wins is None:
                    skipped["tie"] += 1
                    continue
                w, l_ = (ia, ib) if a_wins else (ib, ia)
                made.append({"prompt": p["prompt_value"], "chosen": texts[w], "rejected": texts[l_],
                             "chosen_gold": gold[w], "rejected_gold": gold[l_]})  # fmt: skip
            pairs_by_prompt.append(made)
        bar.update(len(chunk))
    bar.close()

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
    out = folder.begin()  # every response is judged: only now does the run replace an old one
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
    print(
        f"[rto] pairs: {len(train_rows)} train + {len(eval_rows)} held-out pairs from {len(prompts)} prompts; "
        f"skipped {skipped}; labels agree with the gold reward on {summary['label_agrees_with_gold']:.3f}",
        flush=True,
    )
    write_summary(out, summary)
    return summary
