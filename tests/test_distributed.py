"""One job on many processes, and one update per global batch.

The same tiny pipeline (sft -> pairs -> rm -> dpo -> rl -> eval) runs once in one process and
once under `torchrun --nproc_per_node 2` (CPU, gloo): sft, rm and dpo end with the same weights
and log the same numbers, pairs and eval write the same files, rl runs with both processes
keeping identical weights, and every metrics line is written once. A two-process run killed
with SIGKILL in the middle of a checkpoint save resumes to the weights of the uninterrupted one.
Processes that do not form one job are refused. And the update of one optimiser step does not
depend on how its batch is cut into micro-batches (sft, rm, dpo and PPO)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import PREF_COMMON, rl_args, rto_ok, sft_args


def torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m rto ARGS`, one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rto", *map(str, args)]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def metric_rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def recipe(task: Path, out: Path) -> dict:
    short = {"data": {"max_length": 96, "max_prompt_length": 32}, "log": {"progress": False}}
    pref = {**short, "data": {**short["data"], "path": "{pairs}/pairs_train.jsonl",
            "eval_path": "{pairs}/pairs_eval.jsonl"}, "model": {"path": "{sft}"},
            "train": {"lr": 5e-3, "batch_size": 16, "micro_batch_size": 8, "max_steps": 3}}  # fmt: skip
    judge = {
        "prompts": str(task / "prompts_eval.jsonl"),
        "num_prompts": 16,
        "gold_reward": "sentiment",
    }
    return {
        "out": str(out),
        "seed": 0,
        "stages": {
            "sft": {"stage": "sft", **short, "model": {"path": str(task / "base_model")},
                    "data": {**short["data"], "path": str(task / "sft_train.jsonl"), "max_rows": 400},
                    "train": {"lr": 1e-2, "batch_size": 16, "micro_batch_size": 8, "max_steps": 6,
                              "save_every": 2}},
            "pairs": {"stage": "pairs", "model": {"path": "{sft}"}, "gold_reward": "sentiment",
                      "log": {"progress": False}, "data": {"path": str(task / "prompts_train.jsonl"),
                      "max_prompt_length": 32, "max_rows": 160, "eval_fraction": 0.2},
                      "generate": {"max_new_tokens": 24, "batch_size": 32}},
            "rm": {"stage": "rm", **pref},
            "dpo": {"stage": "dpo", **pref},
            "rl": {"stage": "rl", "preset": "rto", "model": {"path": "{sft}"}, "reward_model": "{rm}",
                   "dpo_model": "{dpo}", "log": {"progress": False}, "eval": judge,
                   "data": {"path": str(task / "prompts_train.jsonl"), "max_prompt_length": 32},
                   "rl": {"rollout_batch_size": 16, "critic_lr": 1e-3},
                   "train": {"lr": 1e-4, "batch_size": 8, "micro_batch_size": 4, "max_steps": 2},
                   "generate": {"max_new_tokens": 24, "batch_size": 16}},
            # critic-free RTO with groups of 4 responses and the DPO model learning online
            "rl_group": {"stage": "rl", "preset": "rto_grpo", "model": {"path": "{sft}"},
                         "reward_model": "{rm}", "dpo_model": "{dpo}", "log": {"progress": False},
                         "data": {"path": str(task / "prompts_train.jsonl"), "max_prompt_length": 32},
                         "rl": {"rollout_batch_size": 8, "samples_per_prompt": 4,
                                "online_dpo": {"enabled": True, "lr": 1e-4}},
                         "train": {"lr": 1e-4, "batch_size": 16, "micro_batch_size": 4, "max_steps": 2},
                         "generate": {"max_new_tokens": 24, "batch_size": 16}},
            "eval": {"stage": "eval", "policies": ["sft={sft}", "rto={rl}"], "ref_model": "{sft}",
                     "reward_model": "{rm}", "data": {"max_prompt_length": 32}, "eval": judge,
                     "generate": {"max_new_tokens": 24, "batch_size": 16}},
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_task: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same recipe in one process (in this one) and in two (torchrun)."""
    root = tmp_path_factory.mktemp("distributed")
    out = {}
    for name in ("one", "two"):
        f = root / f"{name}.yaml"
        f.write_text(yaml.safe_dump(recipe(tiny_task, root / name), sort_keys=False))
        out[name] = root / name
        if name == "one":
            rto_ok("pipeline", "--config", f)
        else:
            done = torchrun("pipeline", "--config", f)
            assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize(("stage", "lr"), [("sft", 1e-2), ("rm", 5e-3), ("dpo", 5e-3)])
def test_two_processes_train_exactly_as_one(runs: dict[str, Path], stage: str, lr: float) -> None:
    """The same update on one process or two, to float rounding: each process packs its own
    share of a batch into rows, so a sequence shares its rows with other sequences, which move
    the last bits of its hidden states, and Adam turns a rounding difference in a gradient entry
    near zero into a visible step: the weights are compared to a small share of the rate."""
    one, two = runs["one"] / stage, runs["two"] / stage
    assert max_difference(one, two) <= 0.02 * lr
    a, b = metric_rows(one), metric_rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]  # each line once, not once a process
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k, v in ra.items():
            assert v == pytest.approx(rb[k], rel=1e-4, abs=1e-7), (ra["step"], k)
    s = json.loads((two / "summary.json").read_text())
    assert s["world_size"] == 2 and s["distributed_type"] == "MULTI_CPU"
    assert s["weights_identical_across_processes"] is True
    assert json.loads((one / "summary.json").read_text())["world_size"] == 1


def test_pairs_and_eval_do_not_depend_on_the_process_count(runs: dict[str, Path]) -> None:
    for name in ("pairs_train.jsonl", "pairs_eval.jsonl"):
        assert (runs["one"] / "pairs" / name).read_text() == (
            runs["two"] / "pairs" / name
        ).read_text()
    # the same responses; scores to float rounding (each process scores a smaller batch)
    one, two = (
        [json.loads(x) for x in (runs[n] / "eval" / "generations" / "sft.jsonl").read_text().splitlines()]
        for n in ("one", "two")
    )  # fmt: skip
    assert [(r["id"], r["response"], r["gold_reward"]) for r in one] == [
        (r["id"], r["response"], r["gold_reward"]) for r in two
    ]
    assert [r["rm_score"] for r in one] == pytest.approx([r["rm_score"] for r in two], abs=1e-5)
    two_rl = [
        json.loads(x)
        for x in (runs["two"] / "eval" / "generations" / "rto.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in two_rl] == list(range(16))  # gathered back in prompt order  # fmt: skip
    assert json.loads((runs["two"] / "eval" / "summary.json").read_text())["world_size"] == 2


def test_rl_on_two_processes(runs: dict[str, Path]) -> None:
    one, two = metric_rows(runs["one"] / "rl"), metric_rows(runs["two"] / "rl")
    assert [r["step"] for r in two] == [0, 1, 2, 2]  # start eval, 2 iterations, final eval
    # the first rollout and the evaluation of the starting policy are the same responses,
    # whatever the process count (per-prompt seeds); the updates then differ (local shuffles)
    for k in (
        "rollout/score",
        "rollout/response_length",
        "rollout/gold_reward",
        "rollout/dpo_reward_sum",
    ):
        assert two[1][k] == pytest.approx(one[1][k], rel=1e-5), k
    assert two[0] == pytest.approx(one[0], rel=1e-5)
    s = json.loads((runs["two"] / "rl" / "summary.json").read_text())
    assert s["weights_identical_across_processes"] is True and s["world_size"] == 2  # fmt: skip


def test_group_estimator_and_online_token_reward_on_two_processes(runs: dict[str, Path]) -> None:
    """rto_grpo with rl.samples_per_prompt 4 and the DPO model learning online: each prompt's
    group stays on one process, so the first rollout, its group advantages and the online
    model's first update read the same numbers on one process and on two."""
    one, two = metric_rows(runs["one"] / "rl_group"), metric_rows(runs["two"] / "rl_group")
    assert [r["step"] for r in two] == [1, 2]
    for k in ("rollout/score", "rollout/response_length", "rollout/dpo_reward_sum",
              "source/dpo/loss", "source/dpo/accuracy", "source/dpo/labelled_share"):  # fmt: skip
        assert two[0][k] == pytest.approx(one[0][k], rel=1e-5), k
    s = json.loads((runs["two"] / "rl_group" / "summary.json").read_text())
    assert s["weights_identical_across_processes"] is True and s["world_size"] == 2  # fmt: skip


def test_killed_two_process_run_resumes_to_the_uninterrupted_weights(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    full = runs["two"] / "sft"  # 6 steps, checkpoints every 2
    config = ["sft", "--config", full / "config.yaml", "--out", tmp_path / "cut"]
    killed = torchrun(*config, env={"RTO_FAULT": "kill_during_save:4"})
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == [".partial-step-4", "step-2"]  # the half-written one is not a checkpoint
    resumed = torchrun(*config, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert max_difference(full, tmp_path / "cut") == 0.0
    assert [r["step"] for r in metric_rows(tmp_path / "cut")] == [1, 2, 3, 4, 5, 6, 6]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_run(a: Path, b: Path) -> None:
    """Two stage folders hold the same results: the same files, every weights file byte for
    byte, every metrics line and summary value but wall-clock times and the folder's own path."""
    volatile = ("time/", "seconds", "per_second", "environment", "token_reward_model")

    def clean(row: dict) -> dict:
        return {k: v for k, v in row.items() if not any(x in k for x in volatile)}

    def read(d: Path, f: Path) -> list[dict]:  # each folder's pipeline root written as ROOT
        text = (d / f).read_text().replace(str(d.parent), "ROOT")
        return (
            [clean(json.loads(x)) for x in text.splitlines()]
            if f.suffix == ".jsonl"
            else [clean(json.loads(text))]
        )

    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        if f.suffix == ".safetensors":
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
        elif f.name in ("metrics.jsonl", "summary.json"):
            assert read(a, f) == read(b, f), f


def test_two_nodes_on_one_machine_run_as_two_processes(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """`torchrun --nnodes 2 --nproc_per_node 1` twice, joined by a local rendezvous, as two
    machines of one process each would start it: each node's process has local rank 0, and
    the pipeline writes what `torchrun --nproc_per_node 2` wrote, to the last bit."""
    recipe_file = tmp_path / "two_nodes.yaml"
    recipe = yaml.safe_load((runs["two"].parent / "two.yaml").read_text())
    recipe_file.write_text(
        yaml.safe_dump({**recipe, "out": str(tmp_path / "nodes")}, sort_keys=False)
    )
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "rto-two-nodes",
           "-m", "rto", "pipeline", "--config", str(recipe_file)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]  # fmt: skip
    for node in nodes:
        _, err = node.communicate(timeout=900)
        assert node.returncode == 0, err[-3000:]
    for stage in ("sft", "rm", "dpo", "rl", "rl_group"):
        same_run(runs["two"] / stage, tmp_path / "nodes" / stage)
    for name in ("pairs_train.jsonl", "pairs_eval.jsonl"):
        assert (runs["two"] / "pairs" / name).read_text() == (
            tmp_path / "nodes" / "pairs" / name
        ).read_text()
    assert json.loads((tmp_path / "nodes" / "rl" / "summary.json").read_text())["world_size"] == 2


def test_fsdp_on_cpus_is_refused_naming_what_runs_there(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """accelerate runs FSDP on GPUs only; on CPUs it would quietly fall back to DDP. rto says so
    and names the configs that do run on CPUs, before writing anything."""
    config = Path(__file__).resolve().parent.parent / "configs" / "accelerate" / "fsdp.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "rto", "sft",
           "--config", str(runs["two"] / "sft" / "config.yaml"), "--out", str(tmp_path / "fsdp")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode != 0
    assert "FSDP, which accelerate runs on GPUs only" in done.stderr
    # one line from rto (the launcher then reports its child's exit status in its own words)
    assert "rto sft: error: the accelerate config asks for FSDP" in done.stderr
    assert "configs/accelerate/ddp.yaml" in done.stderr
    assert not (tmp_path / "fsdp").exists()


def test_processes_that_do_not_form_one_job_are_refused(tiny_task: Path, tmp_path: Path) -> None:
    # what happened before: something built accelerate's state before rto could join the
    # processes, so each of N launched processes would have trained alone into one folder
    code = ("from accelerate import PartialState; PartialState(); from rto.cli import main; "
            "raise SystemExit(main())")  # fmt: skip
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "o"
    done = subprocess.run([sys.executable, "-c", code, *map(str, sft_args(tiny_task, out))],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 2
    assert "started as 2 processes" in done.stderr and "torchrun --nproc_per_node" in done.stderr
    assert not out.exists()


# ------------------------------------------------------------------ one update per global batch


def last_update(folder: Path, key: str) -> float:
    return [r for r in metric_rows(folder) if key in r][0][key]


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "rl"])
def test_the_update_does_not_depend_on_the_micro_batch_size(
    stage: str, tiny_task: Path, sft_model: Path, pairs_data: Path, reward_model: Path,
    dpo_model: Path, tmp_path: Path,
) -> None:  # fmt: skip
    """micro_batch_size 1, 2 and 4 split a batch of 8 differently; the loss is a mean over the
    whole batch's tokens (sft, PPO) or pairs (rm, dpo), so the gradient is the same. (Before, a
    mean per micro-batch weighted short and long micro-batches alike: the updates differed by up
    to twice the learning rate.) Adam turns a tiny rounding difference in a gradient entry that is
    nearly zero into a visible step, so weights are compared to a small share of the rate."""
    lr = 3e-3
    pref = ["--model.path", sft_model, "--data.path", pairs_data / "pairs_train.jsonl", "--data.max_rows", "64",
            "--train.lr", str(lr), "--train.batch_size", "8", "--train.max_steps", "2", *PREF_COMMON]  # fmt: skip
    outs = []
    for m in (1, 2, 4):
        out = tmp_path / f"m{m}"
        micro = ["--train.micro_batch_size", str(m)]
        if stage == "sft":
            rto_ok(*sft_args(tiny_task, out, "--data.max_rows", "64", "--train.batch_size", "8",
                             "--train.max_steps", "2", "--train.lr", str(lr), *micro))  # fmt: skip
        elif stage in ("rm", "dpo"):
            rto_ok(stage, "--out", out, *pref, *micro)
        else:
            rto_ok(*rl_args(tiny_task, sft_model, reward_model, dpo_model, out, "--preset", "rto",
                            "--rl.rollout_batch_size", "16", "--train.batch_size", "8",
                            "--train.max_steps", "1", "--train.lr", str(lr), *micro))  # fmt: skip
        outs.append(out)
    loss_key, norm_key = (
        ("policy/loss", "policy/grad_norm") if stage == "rl" else ("loss", "grad_norm")
    )
    for out in outs[1:]:
        assert last_update(out, loss_key) == pytest.approx(last_update(outs[0], loss_key), rel=1e-5)
        assert last_update(out, norm_key) == pytest.approx(last_update(outs[0], norm_key), rel=1e-5)
        assert max_difference(outs[0], out) < 0.02 * lr


# ------------------------------------------------------------------ DeepSpeed


@pytest.mark.parametrize("config", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_configs_run_on_two_cpu_processes(
    runs: dict[str, Path], tmp_path: Path, config: str
) -> None:
    """The shipped DeepSpeed configs with 2 CPU processes (needs `pip install deepspeed`): SFT ends
    where DDP ends, RL (one engine for policy and critic; under ZeRO-3 the policy's weights
    gathered once per rollout for generation) runs the same first rollout, and so does RL with
    the DPO model learning online (a second DeepSpeed engine: under ZeRO-3 sharded, its update
    read from the same rollout as DDP's), which saves what it learned whole."""
    pytest.importorskip("deepspeed")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(Path(__file__).resolve().parent.parent / "configs" / "accelerate" / f"{config}.yaml"),
              "--num_processes", "2", "--main_process_port", "0", "-m", "rto"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for stage in ("sft", "rl", "rl_group"):
        cmd = [
            *launch,
            stage.removesuffix("_group"),
            "--config",
            str(runs["two"] / stage / "config.yaml"),
            "--out",
            str(tmp_path / stage),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        s = json.loads((tmp_path / stage / "summary.json").read_text())
        assert s["distributed_type"] == "DEEPSPEED" and s["world_size"] == 2
    assert max_difference(runs["two"] / "sft", tmp_path / "sft") < 0.02 * 1e-2  # lr 1e-2
    ddp, ds = metric_rows(runs["two"] / "rl"), metric_rows(tmp_path / "rl")
    assert ds[1]["rollout/score"] == pytest.approx(ddp[1]["rollout/score"], rel=1e-5)
    ddp, ds = metric_rows(runs["two"] / "rl_group"), metric_rows(tmp_path / "rl_group")
    for k in ("rollout/score", "rollout/dpo_reward_sum", "source/dpo/loss", "source/dpo/accuracy"):
        assert ds[0][k] == pytest.approx(ddp[0][k], rel=1e-5), k
    assert ds[-1]["source/dpo/updates"] == 2.0 and ds[-1]["source/dpo/skipped_steps"] == 0.0
    learned = weights(tmp_path / "rl_group" / "token_reward_model")
    assert learned.keys() == weights(runs["two"] / "rl_group" / "token_reward_model").keys()
