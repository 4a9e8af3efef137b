"""The GPU check behind benchmarks/gpu_check.sh: every stage in bf16 for a few steps on a
Llama-shaped model of about 1B parameters built here with random weights (no download), then
the numbers that say whether a GPU does its job: generated tokens/s, training tokens/s and peak
GPU memory of PPO and RTO, and the time and throughput of every other stage.

    python benchmarks/gpu_check.py [--size 1b|tiny] [--out DIR]

`--size tiny` is the same check at test size: it runs on a CPU in seconds, so CI keeps it
working. Results: OUT/gpu_check.json and OUT/gpu_check.md (the table for the README).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent

# Llama-3.2-1B's width, depth and heads (hidden 2048, 16 heads of 128) with 20 layers of the
# task model's MLP (8/3 x hidden), about 1.0B parameters; the vocabulary is the task's own 512.
SIZES: dict[str, dict[str, Any]] = {
    "1b": {
        "task": {"hidden_size": 2048, "num_layers": 20, "num_heads": 16, "max_positions": 256,
                 "num_sft": 2000, "num_train_prompts": 1024, "num_eval_prompts": 64},
        "steps": 8, "batch": 32, "micro": 8, "rollout": 64, "rl_steps": 3, "new_tokens": 128,
        "pair_prompts": 256,
    },
    "tiny": {
        "task": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_positions": 160,
                 "num_sft": 200, "num_train_prompts": 64, "num_eval_prompts": 16, "vocab_size": 300},
        "steps": 2, "batch": 8, "micro": 4, "rollout": 8, "rl_steps": 1, "new_tokens": 8,
        "pair_prompts": 32,
    },
}  # fmt: skip


def recipe(size: str, out: Path) -> dict[str, Any]:
    z = SIZES[size]
    short = {"data": {"max_length": 96, "max_prompt_length": 32}, "log": {"progress": False}}
    train = {"lr": 1e-5, "batch_size": z["batch"], "micro_batch_size": z["micro"],
             "max_steps": z["steps"], "mixed_precision": "auto"}  # fmt: skip
    pref = {**short, "model": {"path": "{sft}"}, "train": train,
            "data": {**short["data"], "path": "{pairs}/pairs_train.jsonl", "eval_fraction": 0.0}}  # fmt: skip
    rl = {"model": {"path": "{sft}"}, "reward_model": "{rm}", "dpo_model": "{dpo}", "log": {"progress": False},
          "data": {"path": "{task}/prompts_train.jsonl", "max_prompt_length": 32},
          "rl": {"rollout_batch_size": z["rollout"], "critic_lr": 1e-5},
          "train": {**train, "batch_size": z["rollout"] // 2, "max_steps": z["rl_steps"]},
          "generate": {"max_new_tokens": z["new_tokens"], "batch_size": z["rollout"]}}  # fmt: skip
    return {
        "description": f"GPU check ({size}): every stage for a few steps on a random-weight model",
        "out": str(out),
        "seed": 0,
        "stages": {
            "task": {"stage": "task", "task": "sentiment", **z["task"]},
            "sft": {"stage": "sft", **short, "model": {"path": "{task}/base_model"}, "train": train,
                    "data": {**short["data"], "path": "{task}/sft_train.jsonl", "eval_fraction": 0.0}},
            "pairs": {"stage": "pairs", "model": {"path": "{sft}"}, "gold_reward": "sentiment",
                      "drop_truncated": False, "log": {"progress": False},
                      "data": {"path": "{task}/prompts_train.jsonl", "max_prompt_length": 32,
                               "max_rows": z["pair_prompts"], "eval_fraction": 0.0},
                      "generate": {"max_new_tokens": 48, "batch_size": 2 * z["pair_prompts"]}},
            "rm": {"stage": "rm", **pref},
            "dpo": {"stage": "dpo", **pref},
            "ppo": {"stage": "rl", "preset": "ppo", **rl},
            "rto": {"stage": "rl", "preset": "rto", **rl},
        },
    }  # fmt: skip


def parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def collect(out: Path) -> dict[str, Any]:
    """The numbers of a finished run, stage by stage."""
    runs = json.loads((out / "pipeline_run.json").read_text())
    stages: dict[str, Any] = {}
    for name, info in runs.items():
        s = json.loads((out / name / "summary.json").read_text())
        row: dict[str, Any] = {"seconds": info.get("seconds")}
        if "train_tokens_per_second" in s:
            row["train_tokens_per_second"] = s["train_tokens_per_second"]
        if "train/time/generated_tokens_per_second" in s:
            row["generated_tokens_per_second"] = s["train/time/generated_tokens_per_second"]
            row["train_tokens_per_second"] = s["train/time/train_tokens_per_second"]
        if "peak_gpu_memory_gib" in s:
            row["peak_gpu_memory_gib"] = s["peak_gpu_memory_gib"]
        stages[name] = row
    env = json.loads((out / "sft" / "summary.json").read_text())
    return {
        "parameters": parameters(out / "task" / "base_model"),
        "device": ", ".join(env["environment"].get("gpus", [])) or env["environment"]["cpu"],
        "world_size": env["world_size"],
        "distributed_type": env["distributed_type"],
        "stages": stages,
        "environment": env["environment"],
    }


def markdown(result: dict[str, Any], size: str, seconds: float) -> str:
    lines = [
        f"GPU check ({size}): {result['parameters'] / 1e6:,.1f}M parameters on {result['device']} "
        f"({result['world_size']} process(es), {result['distributed_type']}); {seconds:.0f} s in all.",
        "",
        "| stage | time (s) | generated tokens/s | training tokens/s | peak GPU memory (GiB) |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["stages"].items():
        cells = [row.get("seconds"), row.get("generated_tokens_per_second"),
                 row.get("train_tokens_per_second"), row.get("peak_gpu_memory_gib")]  # fmt: skip
        lines.append(
            f"| {name} | " + " | ".join("" if c is None else f"{c:,.1f}" for c in cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "_runs" / "gpu_check"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe_file = out / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe(args.size, out / "run"), sort_keys=False))
    from rto.cli import main as rto

    began = time.time()
    code = rto(["pipeline", "--config", str(recipe_file), "--force", "task"])
    if code != 0:
        raise SystemExit(code)
    result = collect(out / "run")
    seconds = time.time() - began
    result.update({"size": args.size, "seconds": round(seconds, 1)})
    from rto.engine.distributed import init_distributed

    if init_distributed().is_main_process:
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
        table = markdown(result, args.size, seconds)
        (out / "gpu_check.md").write_text(table)
        print(table, flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
