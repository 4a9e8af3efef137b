"""Shared fixtures: a tiny built-in task and an SFT policy trained on it, built once per session
through the same commands a user runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(2)

from rto.cli import main as rto_main  # noqa: E402

TINY_TASK = [
    "--num_sft", "3000", "--num_sft_eval", "60", "--num_train_prompts", "1200", "--num_eval_prompts", "64",
    "--vocab_size", "400", "--hidden_size", "64", "--num_layers", "2", "--num_heads", "2", "--max_positions", "96",
]  # fmt: skip


def rto(*args: str) -> int:
    """Run the CLI in this process; return its exit status."""
    return rto_main([str(a) for a in args])


def rto_ok(*args: str) -> None:
    code = rto(*args)
    assert code == 0, f"rto {' '.join(map(str, args))} exited with {code}"


def rto_subprocess(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rto", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=600,
    )


def sft_args(task: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sft", "--out", out, "--model.path", task / "base_model",
        "--data.path", task / "sft_train.jsonl", "--data.eval_path", task / "sft_eval.jsonl",
        "--data.max_length", "96", "--data.max_prompt_length", "32",
        "--train.lr", "3e-3", "--train.batch_size", "32", "--train.micro_batch_size", "16",
        "--train.warmup_ratio", "0.05", "--log.progress", "false",
        "--generate.max_new_tokens", "40", "--generate.batch_size", "64", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("task")
    rto_ok("task", "sentiment", "--out", out, *TINY_TASK)
    return out


def build_task(out: Path, arch: str, chat_template: str, *extra: str) -> Path:
    rto_ok("task", "sentiment", "--out", out, *TINY_TASK, "--arch", arch,
           "--chat_template", chat_template, *extra)  # fmt: skip
    return out


# The same task on the shapes real models have: a GPT-2 with its dropout (0.1), a Qwen2 with a
# ChatML template (text after <|im_end|>) and dropout, a Llama with a Llama-3 template (turns end
# with <|eot_id|>, EOS <|end_of_text|>), and the built-in Llama with a simple template.
@pytest.fixture(scope="session")
def gpt2_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_task(tmp_path_factory.mktemp("gpt2_task"), "gpt2", "none")


@pytest.fixture(scope="session")
def qwen2_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_task(tmp_path_factory.mktemp("qwen2_task"), "qwen2", "chatml", "--dropout", "0.1")


@pytest.fixture(scope="session")
def llama3_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_task(tmp_path_factory.mktemp("llama3_task"), "llama", "llama3")


@pytest.fixture(scope="session")
def chat_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_task(tmp_path_factory.mktemp("chat_task"), "llama", "simple")


@pytest.fixture(scope="session")
def sft_model(tiny_task: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sft")
    rto_ok(*sft_args(tiny_task, out, "--overwrite", "--train.epochs", "4", "--train.lr", "1e-2",
                     "--train.micro_batch_size", "32",
                     "--eval.prompts", tiny_task / "prompts_eval.jsonl",
                     "--eval.gold_reward", "sentiment", "--eval.fluency", "sentiment"))  # fmt: skip
    return out


PREF_COMMON = [
    "--data.max_length",
    "96",
    "--data.max_prompt_length",
    "32",
    "--log.progress",
    "false",
]


@pytest.fixture(scope="session")
def pairs_data(sft_model: Path, tiny_task: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    rto_ok("pairs", "--out", out, "--overwrite", "--model.path", sft_model, "--data.path", tiny_task / "prompts_train.jsonl",
           "--data.max_prompt_length", "32", "--gold_reward", "sentiment", "--generate.max_new_tokens", "40", "--data.eval_fraction", "0.15",
           "--generate.batch_size", "128", "--log.progress", "false")  # fmt: skip
    return out


@pytest.fixture(scope="session")
def reward_model(
    sft_model: Path, pairs_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("rm")
    rto_ok("rm", "--out", out, "--overwrite", "--model.path", sft_model, "--data.path", pairs_data / "pairs_train.jsonl",
           "--data.eval_path", pairs_data / "pairs_eval.jsonl", "--train.lr", "5e-3", "--train.batch_size", "32",
           "--train.micro_batch_size", "32", "--train.epochs", "6", *PREF_COMMON)  # fmt: skip
    return out


@pytest.fixture(scope="session")
def dpo_model(sft_model: Path, pairs_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dpo")
    rto_ok("dpo", "--out", out, "--overwrite", "--model.path", sft_model, "--data.path", pairs_data / "pairs_train.jsonl",
           "--data.eval_path", pairs_data / "pairs_eval.jsonl", "--train.lr", "5e-3", "--train.batch_size", "32",
           "--train.micro_batch_size", "32", "--train.epochs", "6", *PREF_COMMON)  # fmt: skip
    return out


def rl_args(task: Path, sft: Path, rm: Path, dpo: Path, out: Path, *extra: str) -> list[str]:
    return [
        "rl", "--out", out, "--model.path", sft, "--reward_model", rm, "--dpo_model", dpo,
        "--data.path", task / "prompts_train.jsonl", "--data.max_prompt_length", "32",
        "--rl.rollout_batch_size", "32", "--train.batch_size", "16", "--train.micro_batch_size", "8",
        "--train.lr", "1e-4", "--rl.critic_lr", "1e-3", "--generate.max_new_tokens", "32",
        "--generate.batch_size", "32", "--log.progress", "false", *extra,
    ]  # fmt: skip
