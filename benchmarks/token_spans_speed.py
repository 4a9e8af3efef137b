"""How long mapping responses to character spans takes (the `function` token-reward source's
overhead per rollout): offsets from a fast tokenizer against the prefix-decoding fallback, side
by side in one run, for a rollout of responses of a given length.

    python benchmarks/token_spans_speed.py --task runs/demo/task --responses 256 --lengths 32,256

Prints seconds per rollout for each path and their ratio; both paths give the same spans
(checked here too).
"""

from __future__ import annotations

import argparse
import json
import random
import time

from rto.config.sections import ModelSection
from rto.data.spans import token_spans
from rto.models.load import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, help="a folder made by `rto task sentiment`")
    parser.add_argument("--responses", type=int, default=256, help="responses in the rollout")
    parser.add_argument("--lengths", default="32,256", help="response lengths in tokens")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tok = load_tokenizer(ModelSection(path=f"{args.task}/base_model"))
    with open(f"{args.task}/sft_train.jsonl") as f:
        rows = [json.loads(line) for line in f][: args.responses * 4]
    text = " ".join(str(v) for row in rows for v in row.values())
    corpus = tok(text, add_special_tokens=False).input_ids
    rng = random.Random(0)
    for length in map(int, args.lengths.split(",")):
        starts = [rng.randrange(0, len(corpus) - length) for _ in range(args.responses)]
        rows = [corpus[s : s + length] for s in starts]
        rows = [tok(tok.decode(r), add_special_tokens=False).input_ids for r in rows]  # canonical
        timings = {}
        for use_offsets in (True, False):
            best = float("inf")
            for _ in range(args.repeats):
                began = time.perf_counter()
                _, spans = token_spans(tok, rows, [], use_offsets=use_offsets)
                best = min(best, time.perf_counter() - began)
            timings[use_offsets] = (best, spans)
        assert timings[True][1] == timings[False][1]
        fast, slow = timings[True][0], timings[False][0]
        print(f"{args.responses} responses of {length} tokens: offsets {fast:.3f} s, "
              f"prefix decoding {slow:.3f} s ({slow / fast:.1f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
