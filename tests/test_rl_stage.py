"""`rto rl` end to end on the tiny task: every preset runs, beta1 = 0 is bit-identical PPO, a
killed run resumes to identical weights, and bad input gets a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import rl_args, rto, rto_ok, rto_subprocess


@pytest.fixture(scope="module")
def models(
    tiny_task: Path, sft_model: Path, reward_model: Path, dpo_model: Path
) -> dict[str, Path]:
    return {"task": tiny_task, "sft": sft_model, "rm": reward_model, "dpo": dpo_model}


def args(m: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return rl_args(m["task"], m["sft"], m["rm"], m["dpo"], out, *extra)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_rto_run_logs_what_practitioners_read(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "rto"
    rto_ok(*args(models, out, "--preset", "rto", "--train.max_steps", "3", "--eval.prompts", models["task"] / "prompts_eval.jsonl",
                 "--eval.num_prompts", "32", "--eval.gold_reward", "sentiment", "--eval.fluency", "sentiment"))  # fmt: skip
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert (
        rows[0]["step"] == 0 and "eval/gold_reward_mean" in rows[0]
    )  # the starting policy, for the curves
    it = rows[1]
    for key in ("rollout/gold_reward", "rollout/score", "rollout/dpo_reward_sum", "rollout/kl", "policy/entropy",
                "policy/loss", "value/loss", "policy/clipfrac", "policy/approx_kl", "value/explained_variance",
                "rollout/response_length", "rollout/truncated_share", "time/generate", "time/score", "time/update",
                "time/generated_tokens_per_second", "samples"):  # fmt: skip
        assert key in it, key
    s = json.loads((out / "summary.json").read_text())
    assert (
        s["preset"] == "rto"
        and s["iterations"] == 3
        and "eval/kl_mean" in s
        and "eval/fluency_rate" in s
    )
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("preset", ["rs_ppo", "semi_rto", "ddpo", "rpp", "rto_rpp"])
def test_every_preset_runs(models: dict[str, Path], tmp_path: Path, preset: str) -> None:
    rto_ok(*args(models, tmp_path / preset, "--preset", preset, "--train.max_steps", "2"))
    s = json.loads((tmp_path / preset / "summary.json").read_text())
    assert s["iterations"] == 2 and s["skipped_steps"] == 0
    row = json.loads((tmp_path / preset / "metrics.jsonl").read_text().splitlines()[-1])
    assert ("value/loss" in row) == (
        preset not in ("rpp", "rto_rpp")
    )  # critic-free presets have no critic
    assert ("rollout/dpo_reward_sum" in row) == (preset != "rpp")


def test_beta1_zero_is_bit_identical_to_ppo(models: dict[str, Path], tmp_path: Path) -> None:
    rto_ok(*args(models, tmp_path / "ppo", "--preset", "ppo", "--train.max_steps", "3"))
    rto_ok(
        *args(
            models,
            tmp_path / "rto0",
            "--preset",
            "rto",
            "--rl.dpo_reward.scale",
            "0",
            "--train.max_steps",
            "3",
        )
    )
    assert same_weights(tmp_path / "ppo", tmp_path / "rto0")
    rto_ok(*args(models, tmp_path / "rto", "--preset", "rto", "--train.max_steps", "3"))
    assert not same_weights(
        tmp_path / "ppo", tmp_path / "rto"
    )  # and beta1 > 0 does change training


def test_killed_rl_run_resumes_to_identical_weights(
    models: dict[str, Path], tmp_path: Path
) -> None:
    common = ["--preset", "rto", "--train.max_steps", "4", "--train.save_every", "2"]
    full = rto_subprocess(*args(models, tmp_path / "full", *common))
    assert full.returncode == 0, full.stderr
    cut = rto_subprocess(
        *args(models, tmp_path / "cut", *common), env={"RTO_FAULT": "kill_after_step:3"}
    )
    assert cut.returncode == -9
    resumed = rto_subprocess(*args(models, tmp_path / "cut", *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step 2" in resumed.stderr
    assert same_weights(tmp_path / "full", tmp_path / "cut")


def test_long_prompts_are_truncated_and_counted(models: dict[str, Path], tmp_path: Path) -> None:
    prompts = tmp_path / "long.jsonl"
    rows = [{"prompt": "the food was good . " * 12 + "the staff was"}] * 16 + [{"prompt": "i"}] * 16
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rto_ok(*args(models, tmp_path / "o", "--preset", "ppo", "--train.max_steps", "1", "--data.path", prompts,
                 "--data.max_prompt_length", "16"))  # fmt: skip
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["data"]["prompts"]["truncated"] == 16


def test_empty_prompt_file(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert rto(*args(models, tmp_path / "o", "--preset", "rto", "--data.path", empty)) == 2
    assert f"file {empty} is empty; it needs at least one row" in capsys.readouterr().err


def test_models_with_another_tokenizer_are_refused(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:  # fmt: skip
    from conftest import TINY_TASK

    other = tmp_path_factory.mktemp("other_tok")
    a = list(TINY_TASK)
    a[a.index("--vocab_size") + 1] = "420"
    rto_ok("task", "sentiment", "--out", other, *a)
    assert (
        rto(*args(models, tmp_path / "o", "--preset", "rto", "--dpo_model", other / "base_model"))
        == 2
    )
    assert "DPO model" in capsys.readouterr().err
    assert (
        rto(*args(models, tmp_path / "o2", "--preset", "rto", "--ref_model", other / "base_model"))
        == 2
    )
    assert "reference model" in capsys.readouterr().err


def test_non_finite_losses_stop_the_run(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = rto(*args(models, tmp_path / "o", "--preset", "ppo", "--train.max_steps", "20", "--train.lr", "1e30",
                     "--rl.critic_lr", "1e30", "--train.grad_clip", "0", "--train.max_nonfinite", "2"))  # fmt: skip
    assert code == 2
    assert "non-finite" in capsys.readouterr().err
