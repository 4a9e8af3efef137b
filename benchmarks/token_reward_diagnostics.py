"""How well does the DPO token reward track the truth? (the RTO paper's key claim, measured)

On the built-in sentiment task the truth is known word by word: VADER's lexicon gives each word
a valence, and VADER flips (x -0.74) a word preceded by a negation within three words. This
script samples responses from the SFT policy to held-out prompts, computes the DPO token reward

    r_dpo(s_h, a_h) = beta * (log pi_dpo(a_h | s_h) - log pi_ref(a_h | s_h))

with beta from the DPO run, sums it over the tokens of each word, and reports its correlation
with the words' lexicon valence and with their valence in context (negation-aware), plus the
mean reward of positive / negative words with and without a negation in front.

    python benchmarks/token_reward_diagnostics.py --run runs/demo
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

NEGATIONS = {"not", "never"}
NEGATION_SCALAR = -0.74  # VADER's N_SCALAR


def words_and_rewards(
    tokenizer, response_ids: list[int], rewards: list[float], eos: set[int]
) -> list[tuple[str, float]]:
    """Group tokens into words (a token whose text starts with a space starts a word)."""
    out: list[list] = []
    for tok, r in zip(response_ids, rewards):
        if tok in eos:
            break
        text = tokenizer.decode([tok])
        if not out or text.startswith(" ") or text.strip() in {".", "!"}:
            out.append([text.strip(), r])
        else:
            out[-1][0] += text.strip()
            out[-1][1] += r
    return [(w, r) for w, r in out if w]


def pearson(x: list[float], y: list[float]) -> float:
    return (
        statistics.correlation(x, y)
        if len(x) > 2 and statistics.pstdev(x) > 0 and statistics.pstdev(y) > 0
        else float("nan")
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--run",
        required=True,
        help="A demo / pipeline output folder with task/, sft/ and dpo/ stages.",
    )
    ap.add_argument(
        "--prompts", type=int, default=400, help="Held-out prompts to sample responses for."
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/token_reward_diagnostics.json")
    args = ap.parse_args(argv)

    from rto.config.sections import GenerateSection, ModelSection
    from rto.data.sources import load_rows, subsample
    from rto.data.tokenize import build_prompts
    from rto.engine.environment import environment
    from rto.models.generate import sample, stop_ids
    from rto.models.load import check_same_tokenizer, load_causal_lm, load_tokenizer
    from rto.rl.roles import SeparateModels
    from rto.rl.sources import dpo_log_ratio
    from rto.tasks.sentiment import word_valence

    torch.set_num_threads(2)
    run = Path(args.run)
    sft, dpo = run / "sft", run / "dpo"
    section = ModelSection(path=str(sft))
    tok = load_tokenizer(section)
    check_same_tokenizer(
        tok, "SFT (reference) model", load_tokenizer(section, path=str(dpo)), "DPO model"
    )
    beta = json.loads((dpo / "dpo.json").read_text())["beta"]
    dpo_summary = json.loads((dpo / "summary.json").read_text())
    ref = load_causal_lm(section, trainable=False)
    pi_dpo = load_causal_lm(section, path=str(dpo), trainable=False)
    rows = subsample(load_rows(str(run / "task" / "prompts_eval.jsonl")), args.prompts, args.seed)
    prompts, _ = build_prompts(rows, tok, max_prompt_length=32, source=str(sft))
    gen = GenerateSection(max_new_tokens=48, batch_size=200)
    eos = stop_ids(tok, ref)
    roles = SeparateModels(policy=ref, ref=ref, dpo=pi_dpo)
    torch.manual_seed(args.seed)
    pairs: list[tuple[str, float, float]] = []  # word, reward, contextual valence
    for i in range(0, len(prompts), gen.batch_size):
        s = sample(ref, [p["prompt_ids"] for p in prompts[i : i + gen.batch_size]], pad_id=tok.pad_token_id, eos=eos,
                   max_new_tokens=gen.max_new_tokens)  # fmt: skip
        batch = {"prompt_ids": s.prompt_ids, "prompt_mask": s.prompt_mask,
                 "response_ids": s.response_ids, "response_mask": s.response_mask}  # fmt: skip
        r = beta * dpo_log_ratio(roles, batch)  # RTO's token reward, as the RL stage computes it
        for ids, rew in zip(s.response_ids.tolist(), r.tolist()):
            words = words_and_rewards(tok, ids, rew, set(eos))
            for j, (w, reward) in enumerate(words):
                negated = any(prev in NEGATIONS for prev, _ in words[max(0, j - 3) : j])
                pairs.append((w, reward, word_valence(w) * (NEGATION_SCALAR if negated else 1.0)))
    rewards = [p[1] for p in pairs]
    plain = [word_valence(p[0]) for p in pairs]
    context = [p[2] for p in pairs]
    sentiment = [(r, v) for r, v in zip(rewards, context) if v != 0]

    def mean_of(cond) -> float | None:
        vals = [p[1] for p, v in zip(pairs, plain) if cond(p, v)]
        return round(statistics.fmean(vals), 4) if vals else None

    result = {
        "words": len(pairs),
        "sentiment_words": len(sentiment),
        "dpo_beta": beta,
        "dpo_heldout_accuracy": dpo_summary.get("eval/rewards/accuracies"),
        "pearson_reward_vs_lexicon_valence": round(pearson(rewards, plain), 4),
        "pearson_reward_vs_valence_in_context": round(pearson(rewards, context), 4),
        "pearson_on_sentiment_words_in_context": round(
            pearson([r for r, _ in sentiment], [v for _, v in sentiment]), 4
        ),
        "sign_agreement_on_sentiment_words": round(
            statistics.fmean(float((r > 0) == (v > 0)) for r, v in sentiment), 4
        ),
        "mean_reward": {
            "positive_word": mean_of(lambda p, v: v > 0 and p[2] > 0),
            "positive_word_after_negation": mean_of(lambda p, v: v > 0 and p[2] < 0),
            "negative_word": mean_of(lambda p, v: v < 0 and p[2] < 0),
            "negative_word_after_negation": mean_of(lambda p, v: v < 0 and p[2] > 0),
            "neutral_word": mean_of(lambda p, v: v == 0),
        },
        "command": "python benchmarks/token_reward_diagnostics.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
