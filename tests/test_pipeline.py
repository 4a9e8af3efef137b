"""`rto pipeline`, `rto eval` and `rto report` on a tiny recipe: every stage runs once, an unchanged
rerun skips them all, one changed RL option reruns only that RL stage and what reads from it, and
an interrupted pipeline resumes where it stopped."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from rto.stages.eval import distinct_n, win_rates

from conftest import TINY_TASK, rto, rto_subprocess

ROOT = Path(__file__).resolve().parent.parent


def task_args() -> dict:
    a = dict(zip(TINY_TASK[::2], TINY_TASK[1::2]))
    return {k.lstrip("-"): int(v) for k, v in a.items()} | {
        "num_sft": 1000,
        "num_train_prompts": 400,
    }


def tiny_recipe(out: Path) -> dict:
    short = {"data": {"max_length": 96, "max_prompt_length": 32}, "log": {"progress": False}}
    judge = {
        "prompts": "{task}/prompts_eval.jsonl",
        "num_prompts": 24,
        "gold_reward": "sentiment",
        "fluency": "sentiment",
    }
    return {
        "out": str(out),
        "seed": 0,
        "defaults": {
            "sft": short,
            "rm": short,
            "dpo": short,
            "rl": {
                "model": {"path": "{sft}"},
                "reward_model": "{rm}",
                "dpo_model": "{dpo}",
                "log": {"progress": False},
                "data": {"path": "{task}/prompts_train.jsonl", "max_prompt_length": 32},
                "rl": {"rollout_batch_size": 16, "critic_lr": 1e-3},
                "train": {
                    "lr": 1e-4,
                    "batch_size": 8,
                    "micro_batch_size": 8,
                    "max_steps": 3,
                    "eval_every": 2,
                },
                "generate": {"max_new_tokens": 24, "batch_size": 16},
                "eval": judge,
            },  # fmt: skip
        },
        "stages": {
            "task": {"stage": "task", "task": "sentiment", **task_args()},
            "sft": {
                "stage": "sft",
                "model": {"path": "{task}/base_model"},
                "data": {"path": "{task}/sft_train.jsonl"},
                "train": {"lr": 1e-2, "batch_size": 32, "micro_batch_size": 32, "epochs": 1},
            },  # fmt: skip
            "pairs": {
                "stage": "pairs",
                "model": {"path": "{sft}"},
                "gold_reward": "sentiment",
                "log": {"progress": False},
                "data": {
                    "path": "{task}/prompts_train.jsonl",
                    "max_prompt_length": 32,
                    "max_rows": 200,
                },
                "generate": {"max_new_tokens": 24, "batch_size": 128},
            },  # fmt: skip
            "rm": {
                "stage": "rm",
                "model": {"path": "{sft}"},
                "data": {"path": "{pairs}/pairs_train.jsonl"},
                "train": {"lr": 1e-3, "batch_size": 16, "micro_batch_size": 16, "max_steps": 4},
            },  # fmt: skip
            "dpo": {
                "stage": "dpo",
                "model": {"path": "{sft}"},
                "data": {"path": "{pairs}/pairs_train.jsonl"},
                "train": {"lr": 1e-3, "batch_size": 16, "micro_batch_size": 16, "max_steps": 4},
            },  # fmt: skip
            "rl_ppo": {"stage": "rl", "preset": "ppo"},
            "rl_rto": {"stage": "rl", "preset": "rto", "train": {"save_every": 1}},
            "eval": {
                "stage": "eval",
                "policies": ["sft={sft}", "dpo={dpo}", "ppo={rl_ppo}", "rto={rl_rto}"],
                "ref_model": "{sft}",
                "reward_model": "{rm}",
                "export": ["alpaca_eval", "arena_hard"],
                "data": {"max_prompt_length": 32},
                "generate": {"max_new_tokens": 24, "batch_size": 32},
                "eval": judge,
            },  # fmt: skip
            "report": {
                "stage": "report",
                "eval": "{eval}",
                "curves": ["ppo={rl_ppo}", "rto={rl_rto}"],
            },
        },
    }


def statuses(out: Path) -> dict[str, str]:
    return {k: v["status"] for k, v in json.loads((out / "pipeline_run.json").read_text()).items()}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pipe")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(root / "run"), sort_keys=False))
    assert rto("pipeline", "--config", recipe) == 0
    return recipe, root / "run"


def test_first_run_runs_every_stage_and_writes_results(pipeline_run: tuple[Path, Path]) -> None:
    _, out = pipeline_run
    assert set(statuses(out).values()) == {"ran"}
    results = json.loads((out / "report" / "results.json").read_text())
    assert set(results["methods"]) == {"sft", "dpo", "ppo", "rto"}
    assert results["environment"]["packages"]["torch"] == torch.__version__  # where it was made
    for m in results["methods"].values():
        assert {
            "gold_reward_mean",
            "gold_reward_sem",
            "kl",
            "fluency_rate",
            "length_mean",
            "win_rate_vs_sft",
        } <= set(m)
    assert results["methods"]["sft"]["kl"] == pytest.approx(
        0.0, abs=1e-6
    )  # the reference against itself
    assert results["config"]["stages"]["rl_rto"]["preset"] == "rto"
    assert (out / "report" / "gold_vs_kl.png").stat().st_size > 1000 and (
        out / "report" / "gold_vs_samples.png"
    ).exists()
    assert "| rto |" in (out / "report" / "results.md").read_text()
    alpaca = json.loads((out / "eval" / "exports" / "alpaca_eval" / "rto.json").read_text())
    assert (
        set(alpaca[0]) == {"instruction", "output", "generator", "dataset"}
        and alpaca[0]["generator"] == "rto"
    )
    arena = json.loads(
        (out / "eval" / "exports" / "arena_hard" / "rto.jsonl").read_text().splitlines()[0]
    )
    assert (
        arena["model_id"] == "rto"
        and arena["choices"][0]["turns"][0]["content"] == alpaca[0]["output"]
    )


def test_token_reward_diagnostics_run_on_a_pipeline_folder(
    pipeline_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """benchmarks/token_reward_diagnostics.py reads task/, sft/ and dpo/ of a finished run."""
    spec = importlib.util.spec_from_file_location(
        "token_reward_diagnostics", ROOT / "benchmarks" / "token_reward_diagnostics.py"
    )
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    _, out = pipeline_run
    res = diag.main(["--run", str(out), "--prompts", "24", "--out", str(tmp_path / "d.json")])
    assert res["words"] > 24 and res["dpo_beta"] == pytest.approx(0.1)
    dpo_summary = json.loads((out / "dpo" / "summary.json").read_text())
    assert res["dpo_heldout_accuracy"] == dpo_summary["eval/rewards/accuracies"]
    for key in ("pearson_reward_vs_lexicon_valence", "pearson_reward_vs_valence_in_context"):
        assert -1.0 <= res[key] <= 1.0
    assert res["environment"]["packages"]["torch"] == torch.__version__


def test_unchanged_rerun_skips_everything_and_one_rl_change_reruns_only_what_depends(
    pipeline_run: tuple[Path, Path],
) -> None:
    recipe, out = pipeline_run
    before = (out / "rl_ppo" / "model.safetensors").stat().st_mtime_ns
    assert rto("pipeline", "--config", recipe) == 0
    assert set(statuses(out).values()) == {"skipped"}
    assert rto("pipeline", "--config", recipe, "--set", "rl_rto.rl.kl.coef=0.2") == 0
    ran = {k for k, v in statuses(out).items() if v == "ran"}
    assert ran == {"rl_rto", "eval", "report"}
    assert (out / "rl_ppo" / "model.safetensors").stat().st_mtime_ns == before


def test_interrupted_pipeline_resumes_the_stage_it_was_in(
    pipeline_run: tuple[Path, Path], tmp_path: Path
) -> None:
    recipe, out = pipeline_run
    # kill the RL run of the RTO stage after its second iteration (checkpoints every iteration)
    cut = rto_subprocess(
        "pipeline", "--config", recipe, "--force", "rl_rto", env={"RTO_FAULT": "kill_after_step:2"}
    )
    assert cut.returncode == -9
    again = rto_subprocess("pipeline", "--config", recipe)
    assert again.returncode == 0, again.stderr
    assert "rl_rto (rl; resuming its interrupted run)" in again.stderr
    assert "resumed from" in again.stderr
    assert statuses(out)["rl_ppo"] == "skipped"


def test_bad_recipes_are_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = tiny_recipe(tmp_path / "run")
    recipe["stages"]["rl_rto"]["rl"] = {"kl": {"coeff": 0.1}}
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert rto("pipeline", "--config", f) == 2
    err = capsys.readouterr().err
    assert (
        "unknown config key 'rl.kl.coeff'" in err
        and "stage rl_rto" in err
        and "Did you mean 'coef'" in err
    )
    assert not (tmp_path / "run" / "task").exists()  # nothing ran
    recipe = tiny_recipe(tmp_path / "run")
    recipe["stages"]["eval"]["policies"].append("x={nope}")
    f.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert rto("pipeline", "--config", f) == 2
    assert "refers to {nope}, which is not an earlier stage" in capsys.readouterr().err


def test_win_rates_and_distinct_n() -> None:
    rates = win_rates({"a": [1.0, 0.0, 0.5], "b": [0.0, 0.0, 1.0]})
    assert rates["a"]["b"] == pytest.approx((1 + 0.5 + 0) / 3) and rates["b"]["a"] == pytest.approx(
        (0 + 0.5 + 1) / 3
    )
    assert distinct_n(["good good good", "good bad"], 1) == pytest.approx(2 / 5)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)


def test_generate_backend_reaches_every_stage_that_samples(capsys: pytest.CaptureFixture) -> None:
    """`rto demo --generate.backend X` (and `rto pipeline`): every stage with a generate section
    samples with X, nothing else changes; vLLM missing is refused before any work."""
    from rto import pipeline

    plain, _ = pipeline.plan("sentiment_quick")
    chosen, _ = pipeline.plan("sentiment_quick", backend="hf")
    backends = {
        p.name: getattr(getattr(p.config, "generate", None), "backend", None) for p in chosen
    }
    sampling = {"sft", "pairs", "dpo", "rl_ppo", "rl_rto", "eval"}
    assert {n for n, b in backends.items() if b} == sampling
    assert all(b in (None, "hf") for b in backends.values())
    assert [p.fingerprint for p in plain] == [p.fingerprint for p in chosen]  # hf is the default
    if importlib.util.find_spec("vllm") is None:
        assert rto("demo", "--generate.backend", "vllm", "--check") == 2
        err = capsys.readouterr().err
        assert "generate.backend" in err and "./install.sh vllm" in err and "stage sft" in err
