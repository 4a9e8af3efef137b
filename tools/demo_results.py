"""The demo's published numbers: one committed file, the tables written from it, and a check that
a fresh `rto demo` still gives them.

    python tools/demo_results.py --save runs/demo    # a finished demo -> results/demo.json
    python tools/demo_results.py --write             # README.md and docs/results/demo.md
                                                          # tables from results/demo.json
    python tools/demo_results.py --check             # are they current? (a test runs it)
    python tools/demo_results.py --compare runs/demo # does a fresh demo give the
                                                          # committed numbers? (a slow test)

README.md holds the table between the markers `<!-- demo table -->` and `<!-- end demo table -->`;
docs/results/demo.md is written whole. The table is the one `rto demo` prints at its end (the
report stage's), so a newcomer can compare the two by eye.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rto.files import replace_marked

ROOT = Path(__file__).resolve().parent.parent
SAVED = ROOT / "benchmarks" / "results" / "demo.json"
SAVED_VLLM = ROOT / "benchmarks" / "results" / "demo_vllm.json"  # rto demo --generate.backend vllm
PAGES = [ROOT / "README.md", ROOT / "docs" / "results" / "demo.md"]
START, END = "<!-- demo table -->", "<!-- end demo table -->"
STAGES = ("task", "sft", "pairs", "rm", "dpo", "rl_ppo", "rl_rto", "eval", "report")
# What must match for a rerun to repeat the numbers to the last digit: float rounding inside the
# math kernels depends on the CPU's vector capability, the libraries' versions and the threads.
SAME_WHEN = ("cpu_capability", "torch_threads", "python")
SAME_PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "peft")


def table(methods: dict) -> str:
    """The table `rto report` prints (and `rto demo` with it)."""
    from rto.stages.eval import format_table

    return format_table({n: {**m, "kl_mean": m["kl"]} for n, m in methods.items()}, "sft")


def stage_notes(run: Path) -> dict:
    """Each stage's numbers a reader checks the run by (from its summary.json), and its seconds."""
    s = {st: json.loads((run / st / "summary.json").read_text()) for st in STAGES}
    times = json.loads((run / "pipeline_run.json").read_text())
    return {
        "sft_heldout_perplexity": s["sft"]["eval/perplexity"],
        "sft_unigram_perplexity": s["sft"]["eval/unigram_perplexity"],
        "pairs_train": s["pairs"]["pairs_train"],
        "pairs_eval": s["pairs"]["pairs_eval"],
        "label_agrees_with_gold": s["pairs"]["label_agrees_with_gold"],
        "gold_heldout_accuracy": s["rm"]["eval/gold_accuracy"],
        "rm_heldout_accuracy": s["rm"]["eval/accuracy"],
        "dpo_heldout_accuracy": s["dpo"].get("eval/rewards/accuracies"),
        "critic_explained_variance": {
            m: s[f"rl_{m}"].get("train/value/explained_variance") for m in ("ppo", "rto")
        },  # fmt: skip
        "seconds": {st: times[st]["seconds"] for st in STAGES if st in times},
    }


def save(run: Path, vllm: bool = False) -> dict:
    results = json.loads((run / "report" / "results.json").read_text())
    saved = {
        "command": "rto demo" + (" --generate.backend vllm" if vllm else ""),
        "methods": results["methods"],
        "environment": results["environment"],
        "stages": stage_notes(run),
    }
    (SAVED_VLLM if vllm else SAVED).write_text(json.dumps(saved, indent=1) + "\n")
    return saved


def vllm_section() -> list[str]:
    """The demo with vLLM generating (every sampling stage), beside the table above."""
    if not SAVED_VLLM.is_file():
        return []
    v = json.loads(SAVED_VLLM.read_text())
    env, p = v["environment"], v["environment"].get("packages", {})
    secs = v["stages"]["seconds"]
    return [
        "## The same demo with vLLM generating",
        "",
        "    ./install.sh vllm    # in an environment of its own",
        "    rto demo --generate.backend vllm",
        "",
        "Every stage that samples (the SFT model's held-out samples, pairs, the RL rollouts, "
        "eval) generates with an in-process vLLM engine; training and scoring are the same code. "
        "vLLM samples with its own sampler, so the same seeds give other responses and the numbers "
        "differ within seed noise, not to the last digit. "
        f"Made on: {env.get('cpu')} ({env.get('cpu_capability')}); torch {p.get('torch')}, "
        f"transformers {p.get('transformers')}. Stage times (seconds): "
        + ", ".join(f"{k} {x:.0f}" for k, x in secs.items())
        + f"; {sum(secs.values()) / 60:.1f} min in all, on a machine shared with other jobs: not "
        "a speed comparison (benchmarks/results/generation.md is one).",
        "",
        table(v["methods"]),
        "",
    ]


def demo_page(saved: dict) -> str:
    """docs/results/demo.md, whole: command, environment, the table, how to read it, the stages."""
    env, st = saved["environment"], saved["stages"]
    p = env.get("packages", {})
    secs = st["seconds"]
    minutes = sum(secs.values()) / 60
    ev = st["critic_explained_variance"]
    return "\n".join(
        [
            "# The demo",
            "",
            "    python3 -m venv .venv && . .venv/bin/activate && ./install.sh && rto demo",
            "",
            "The whole pipeline on the built-in sentiment task (recipe `src/rto/recipes/sentiment_quick.yaml`): "
            "task, sft, pairs, rm, dpo, rl with the `ppo` and `rto` presets, eval, report; it writes "
            "`runs/demo/report/results.{json,md}` and two plots, and prints the table below at its end.",
            "",
            f"Made on: {env.get('cpu')} ({env.get('cpu_capability')}), {env.get('torch_threads')} torch threads; "
            f"Python {env.get('python')}, torch {p.get('torch')}, transformers {p.get('transformers')}, "
            f"accelerate {p.get('accelerate')}, tokenizers {p.get('tokenizers')}. "
            f"Stage times (seconds): "
            + ", ".join(f"{k} {v:.0f}" for k, v in secs.items())
            + f"; {minutes:.1f} min in all.",
            "",
            "400 held-out prompts, one sampled response each; gold = the task's gold reward (VADER "
            "sentiment of the response, in [-1, 1]) with one standard error; KL to the SFT policy in "
            "nats per response; fluency = share of responses that pass the task's well-formedness check; "
            "win vs sft judged by the gold reward.",
            "",
            START,
            table(saved["methods"]),
            END,
            "",
            "How to read it: both RL methods raise the gold reward far above the SFT policy while "
            "staying close to it (a KL of a few nats) and mostly fluent. One seed cannot rank PPO and "
            "RTO: their difference here is within two standard errors and at different KLs; the "
            "equal-KL comparison over seeds is the paper miniature's "
            "([studies/results/paper_miniature.md](../../studies/results/paper_miniature.md)). DPO "
            "reaches a higher gold reward by moving much further from the reference, and more than half "
            "of its responses are no longer well-formed reviews, which the gold reward does not punish.",
            "",
            "## The stages",
            "",
            "| stage | result |",
            "|---|---|",
            f"| sft | held-out perplexity {st['sft_heldout_perplexity']:.2f} (a unigram model: {st['sft_unigram_perplexity']:.1f}) |",
            f"| pairs | {st['pairs_train']} + {st['pairs_eval']} pairs; the sampled (Bradley-Terry) labels agree with the gold reward on {st['label_agrees_with_gold']:.3f} of them |",
            f"| rm | held-out pairwise accuracy {st['rm_heldout_accuracy']:.3f} (the gold reward's on the same pairs: {st['gold_heldout_accuracy']:.3f}) |",
            f"| dpo | held-out implicit-reward accuracy {st['dpo_heldout_accuracy']:.3f} |",
            f"| rl ppo / rto | 100 iterations of 64 prompts; the critic's explained variance at the end {ev['ppo']:.2f} / {ev['rto']:.2f} |",
            "",
            "## What repeats where",
            "",
            "On the machine kind and library versions above, a fresh clone's `rto demo` prints this "
            "table to the last digit (`python -m pytest -m slow -k demo` reruns it and compares with "
            "`benchmarks/results/demo.json`, from which this page and the README's table are written "
            "by `python tools/demo_results.py --write`). Library versions alone need not move "
            "them: with transformers 5.24 / accelerate 1.15 in place of 5.25 / 1.16 the demo printed "
            "this table to the last digit. On another CPU kind (another vector capability), another "
            "thread count or other library builds, float rounding differs, the difference grows "
            "through sampling, and the numbers move within their seed spread. "
            + seed_spread_text(),
            "",
            *vllm_section(),
        ]
    )


def seed_spread_text() -> str:
    """The measured spread over seeds of the same recipe (the paper miniature's runs), which bounds
    how far the demo's gold rewards move where float rounding differs."""
    f = ROOT / "studies" / "results" / "paper_miniature.json"
    if not f.is_file():
        return "The paper miniature's standard deviations over seeds show its size."
    import statistics

    mini = json.loads(f.read_text())
    per_seed = mini["per_seed"]["main"]
    parts = []
    for name in ("sft", "dpo", "ppo", "rto"):
        gold = [r[name]["gold_reward_mean"] for r in per_seed.values() if name in r]
        if len(gold) > 1:
            parts.append(f"{name} {statistics.stdev(gold):.3f}")
    return (
        f"Its measured size: over {len(mini['seeds'])} seeds of the same recipe (the paper "
        "miniature, [studies/results/paper_miniature.md](../../studies/results/paper_miniature.md)), "
        "the standard deviation of the held-out gold reward is " + ", ".join(parts) + "."
    )


def rendered(page: Path, saved: dict) -> str:
    if page.name == "demo.md":
        return demo_page(saved)
    return replace_marked(page.read_text(), START, END, table(saved["methods"]), str(page))


def write(saved: dict) -> None:
    for page in PAGES:
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(rendered(page, saved))
        print(f"wrote the demo table into {page}")


def check(saved: dict) -> list[str]:
    """The pages whose demo table is not the one written from results/demo.json."""
    return [str(p) for p in PAGES if not p.is_file() or p.read_text() != rendered(p, saved)]


def same_environment(a: dict, b: dict) -> list[str]:
    """What differs between two environments that moves the last digits."""
    differ = [f"{k}: {a.get(k)} vs {b.get(k)}" for k in SAME_WHEN if a.get(k) != b.get(k)]
    pa, pb = a.get("packages", {}), b.get("packages", {})
    differ += [f"{p}: {pa.get(p)} vs {pb.get(p)}" for p in SAME_PACKAGES if pa.get(p) != pb.get(p)]
    return differ


def compare(run: Path, saved: dict) -> tuple[list[str], list[str]]:
    """(numbers that differ, environment differences) between a finished demo and the saved one."""
    fresh = json.loads((run / "report" / "results.json").read_text())
    differ = []
    for name, row in saved["methods"].items():
        got = fresh["methods"].get(name, {})
        for key, value in row.items():
            if got.get(key) != value:
                differ.append(f"{name} {key}: committed {value}, this run {got.get(key)}")
    return differ, same_environment(saved["environment"], fresh["environment"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--save", type=Path, help="A finished demo's folder: its results become the committed ones."
    )
    ap.add_argument(
        "--write",
        action="store_true",
        help="Write the tables into README.md and docs/results/demo.md.",
    )
    ap.add_argument(
        "--check", action="store_true", help="Exit 1 when a page's table is not current."
    )
    ap.add_argument(
        "--compare",
        type=Path,
        help="A finished demo's folder to compare with the committed numbers.",
    )
    ap.add_argument(
        "--save-vllm", type=Path, help="A finished `rto demo --generate.backend vllm` folder."
    )
    args = ap.parse_args(argv)  # fmt: skip
    if args.save_vllm:
        save(args.save_vllm, vllm=True)
    saved = save(args.save) if args.save else json.loads(SAVED.read_text())
    if args.write:
        write(saved)
    if args.check:
        stale = check(saved)
        if stale:
            print(
                "stale demo table in "
                + ", ".join(stale)
                + ": run python tools/demo_results.py --write"
            )
            return 1
        print("the demo tables are current")
    if args.compare:
        differ, env = compare(args.compare, saved)
        print(table(json.loads((args.compare / "report" / "results.json").read_text())["methods"]))
        if env:
            print(
                "environment differs from the committed run's (the last digits may move): "
                + "; ".join(env)
            )
        if differ:
            print(
                f"{len(differ)} numbers differ from benchmarks/results/demo.json:\n  "
                + "\n  ".join(differ[:20])
            )
            return 1
        print("every number equals benchmarks/results/demo.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
