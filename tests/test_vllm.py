"""generate.backend vllm: what a user sees when vLLM generates instead of transformers.

Every test but the first two needs vLLM (`./install.sh vllm`), is marked `vllm` and skips with
that reason without it; CI runs them all in a second environment (`pytest -m vllm`, with
DeepSpeed for the ZeRO-3 test). Engines start eager (`generate.vllm_eager`) so that each starts
in seconds.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import rl_args, rto, rto_ok, rto_subprocess

VLLM = ["--generate.backend", "vllm", "--generate.vllm_eager", "true"]
# marked `vllm`, and skipped before their fixtures are built when vLLM is not installed
needs_vllm = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed (./install.sh vllm)"),
]  # fmt: skip


def vllm_test(fn):  # noqa: ANN001, ANN201
    for mark in needs_vllm:
        fn = mark(fn)
    return fn


def records(folder: Path, name: str) -> list[dict]:
    lines = (folder / "generations" / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def eval_args(task: Path, out: Path, policies: str, *extra: str) -> list[str]:
    return ["eval", "--out", out, "--policies", policies, "--eval.prompts", task / "prompts_eval.jsonl",
            "--eval.gold_reward", "sentiment", "--data.max_prompt_length", "32", "--generate.max_new_tokens", "40",
            "--log.progress", "false", *extra]  # fmt: skip


def test_missing_vllm_is_a_clear_error(tiny_task: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "vllm" else real(n, *a)
    )
    out = tmp_path / "eval"
    code = rto(
        *eval_args(tiny_task, out, f"base={tiny_task / 'base_model'}", "--generate.backend", "vllm")
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "generate.backend" in err and "./install.sh vllm" in err and "Traceback" not in err
    assert not out.exists()


@vllm_test
def test_greedy_eval_equals_hf_token_for_token(
    sft_model: Path, tiny_task: Path, tmp_path: Path
) -> None:
    greedy = ["--generate.temperature", "0"]
    rto_ok(*eval_args(tiny_task, tmp_path / "hf", f"sft={sft_model}", *greedy))
    rto_ok(*eval_args(tiny_task, tmp_path / "vllm", f"sft={sft_model}", *greedy, *VLLM,
                      "--generate.batch_size", "7"))  # fmt: skip
    hf, vl = records(tmp_path / "hf", "sft"), records(tmp_path / "vllm", "sft")
    assert len(hf) == 64
    assert [r["response"] for r in vl] == [r["response"] for r in hf]
    assert [r["truncated"] for r in vl] == [r["truncated"] for r in hf]
    assert not all(r["truncated"] for r in hf)  # the stop at EOS is part of what is compared


def test_an_engine_error_shows_vllms_reason_and_the_key_that_fixes_it() -> None:
    """What vLLM raises when its engine cannot start (pydantic's ValidationError first says how
    many errors, then the reason): the message keeps the reason and names the config keys."""
    from pydantic import BaseModel, ValidationError, field_validator

    from rto.config.sections import GenerateSection
    from rto.errors import ConfigError
    from rto.models.vllm_engine import _engine_error, engine_reason

    class ModelConfig(BaseModel):
        max_model_len: int

        @field_validator("max_model_len")
        @classmethod
        def fits(cls, v: int) -> int:
            raise ValueError(f"User-specified max_model_len ({v}) is greater than the derived "
                             "max_model_len (max_position_embeddings=128 in model's config.json)")  # fmt: skip

    with pytest.raises(ValidationError) as caught:
        ModelConfig(max_model_len=768)
    assert "1 validation error for ModelConfig" in str(caught.value)
    reason = engine_reason(caught.value)
    assert reason.startswith("ValidationError: User-specified max_model_len (768) is greater")
    assert "[type=" not in reason and "validation error for" not in reason
    error = _engine_error(caught.value, GenerateSection(), "runs/sft")
    assert isinstance(error, ConfigError)
    assert "max_position_embeddings=128" in str(error) and "generate.vllm_max_model_len" in str(
        error
    )
    assert "data.max_prompt_length" in str(error) and "generate.max_new_tokens" in str(error)


@vllm_test
def test_eval_of_a_model_with_fewer_positions_than_prompt_and_response(
    sft_model: Path, tiny_task: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`rto eval` with the default lengths (prompt 512 + 256 new tokens) on a model of 96
    positions: the engine serves the model's 96, says so in one line naming the keys, and
    replies as transformers does; a vllm_max_model_len beyond the model's positions is
    refused naming that key, before anything is written."""
    args = ["eval", "--policies", f"sft={sft_model}", "--ref_model", sft_model, "--eval.prompts",
            tiny_task / "prompts_eval.jsonl", "--eval.num_prompts", "16", "--generate.temperature", "0",
            "--log.progress", "false"]  # fmt: skip
    rto_ok(*args, "--out", tmp_path / "hf")
    rto_ok(*args, "--out", tmp_path / "vllm", *VLLM)
    err = capsys.readouterr().err
    assert "(512 + 256 = 768) is more than the 96 positions" in err
    assert "data.max_prompt_length" in err and "generate.max_new_tokens" in err
    hf, vl = records(tmp_path / "hf", "sft"), records(tmp_path / "vllm", "sft")
    assert [r["response"] for r in vl] == [r["response"] for r in hf]
    assert (
        rto(*args, "--out", tmp_path / "too_long", *VLLM, "--generate.vllm_max_model_len", "200")
        == 2
    )
    err = capsys.readouterr().err
    assert "config key 'generate.vllm_max_model_len' (200) is more than the 96 positions" in err
    assert not (tmp_path / "too_long").exists()


@vllm_test
def test_eval_of_several_policies_reuses_one_engine_with_each_ones_weights(
    sft_model: Path, tiny_task: Path, tmp_path: Path
) -> None:
    """Two policies of one architecture in one `rto eval`: one engine, each policy's weights
    loaded in turn; each one's greedy replies equal transformers' for that policy."""
    from rto.models import vllm_engine

    both = f"sft={sft_model},base={tiny_task / 'base_model'}"
    greedy = ["--generate.temperature", "0", "--eval.num_prompts", "24"]
    rto_ok(*eval_args(tiny_task, tmp_path / "hf", both, *greedy))
    made = []
    real = vllm_engine._ENGINE.put
    vllm_engine._ENGINE.clear()
    vllm_engine._ENGINE.put = lambda key, llm: (made.append(key), real(key, llm))[1]  # type: ignore[method-assign]
    try:
        rto_ok(*eval_args(tiny_task, tmp_path / "vllm", both, *greedy, *VLLM))
    finally:
        vllm_engine._ENGINE.put = real  # type: ignore[method-assign]
    assert len(made) == 1  # the second policy reused the first one's engine
    for name in ("sft", "base"):
        hf, vl = records(tmp_path / "hf", name), records(tmp_path / "vllm", name)
        assert [r["response"] for r in vl] == [r["response"] for r in hf], name
    assert [r["response"] for r in records(tmp_path / "vllm", "sft")] != [
        r["response"] for r in records(tmp_path / "vllm", "base")
    ]


@vllm_test
def test_seeded_pairs_do_not_depend_on_the_batch_size(
    sft_model: Path, tiny_task: Path, tmp_path: Path
) -> None:
    files = []
    for batch in ("128", "6"):
        out = tmp_path / f"pairs{batch}"
        rto_ok("pairs", "--out", out, "--model.path", sft_model, "--data.path", tiny_task / "prompts_train.jsonl",
               "--data.max_rows", "48", "--data.max_prompt_length", "32", "--gold_reward", "sentiment",
               "--generate.max_new_tokens", "40", "--generate.batch_size", batch, "--log.progress", "false", *VLLM)  # fmt: skip
        files.append((out / "pairs_train.jsonl").read_text())
    assert files[0] == files[1] and files[0].count("\n") > 5


@vllm_test
@pytest.mark.parametrize(
    "layout", ["full", "lora", "lora_served", "shared_base", "shared_base_served"]
)
def test_rl_syncs_the_trained_policy_into_the_engine(
    layout: str, sft_model: Path, reward_model: Path, dpo_model: Path, tiny_task: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """After 2 RL updates, the run's own greedy held-out samples (vLLM, weights synced) equal
    what transformers samples greedily from the saved policy, and differ from the SFT model's:
    a full model, a LoRA policy and the shared base's policy adapter, each merged into the
    engine's weights or served as an adapter by vLLM's LoRA (generate.vllm_lora adapter).
    vLLM's sampling log-probs are logged beside the trainer's: close in float32."""
    evals = ["--eval.prompts", tiny_task / "prompts_eval.jsonl", "--eval.gold_reward", "sentiment",
             "--eval.num_prompts", "32", "--generate.temperature", "0"]  # fmt: skip
    rm, dpo, extra = reward_model, dpo_model, []
    if layout != "full":
        extra = ["--lora.r", "4", "--train.lr", "3e-2"]
    if layout.endswith("_served"):  # vLLM serves the adapter on its base, not merged weights
        extra += ["--generate.vllm_lora", "adapter"]
    if layout.startswith("shared_base"):  # the DPO and reward models as adapters on the SFT model
        from test_shared_base import make_adapter

        dpo = make_adapter(sft_model, tmp_path / "dpo_adapter", score_head=False, seed=3)
        rm = make_adapter(sft_model, tmp_path / "rm_adapter", score_head=True, seed=4)
        extra += ["--rl.score.normalization", "running"]
    out = tmp_path / "rl"
    rto_ok(*rl_args(tiny_task, sft_model, rm, dpo, out, "--train.max_steps", "2",
                    "--train.lr", "3e-3", *evals, *VLLM, *extra))  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["roles"] == (
        "one shared base" if layout.startswith("shared_base") else "separate models"
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["rollout/sampler_gap_abs"] for r in rows if "rollout/sampler_gap_abs" in r]
    assert len(gaps) == 2 and all(0 <= g < 1e-3 for g in gaps), gaps  # same maths, float32
    rto_ok(*eval_args(tiny_task, tmp_path / "ev", f"rl={out},sft={sft_model}", "--eval.num_prompts", "32",
                      "--generate.temperature", "0", "--generate.max_new_tokens", "32"))  # fmt: skip
    rl_hf, sft_hf = records(tmp_path / "ev", "rl"), records(tmp_path / "ev", "sft")
    assert [r["response"] for r in rl_hf] != [r["response"] for r in sft_hf]  # the updates show
    mean = lambda rs, k: sum(float(r[k]) for r in rs) / len(rs)  # noqa: E731
    assert summary["eval/length_mean"] == pytest.approx(mean(rl_hf, "length"), abs=1e-9)
    assert summary["eval/gold_reward_mean"] == pytest.approx(mean(rl_hf, "gold_reward"), abs=1e-9)


@vllm_test
def test_truncated_importance_sampling_runs_with_vllm_and_changes_only_the_policy_loss(
    sft_model: Path, reward_model: Path, dpo_model: Path, tiny_task: Path, tmp_path: Path
) -> None:
    """rl.sampler.correction tis on vLLM rollouts: the same rollouts (same seeds), the weights
    near 1 (float32 samplers agree), none capped; the first update's loss moves by no more than
    the weights do."""
    runs = {}
    for name, extra in (
        ("plain", []),
        ("tis", ["--rl.sampler.correction", "tis", "--rl.sampler.tis_cap", "1.5"]),
    ):
        out = tmp_path / name
        rto_ok(*rl_args(tiny_task, sft_model, reward_model, dpo_model, out, "--train.max_steps", "1",
                        *VLLM, *extra))  # fmt: skip
        runs[name] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    plain, tis = runs["plain"], runs["tis"]
    assert tis["rollout/response_length"] == plain["rollout/response_length"]  # same samples
    assert tis["rollout/sampler_tis_capped_share"] == 0.0
    assert tis["policy/loss"] == pytest.approx(plain["policy/loss"], rel=1e-2, abs=1e-5)


@vllm_test
def test_engine_greedy_equals_hf_after_weight_changes(sft_model: Path) -> None:
    """load_weights puts changed weights (a full model, and a LoRA adapter merged) in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rto.config.sections import GenerateSection
    from rto.models.generate import HFGenerator, stop_ids
    from rto.models.generators import make_generator

    tok = AutoTokenizer.from_pretrained(sft_model)
    model = AutoModelForCausalLM.from_pretrained(sft_model, dtype=torch.float32)
    eos = stop_ids(tok, model)
    g = GenerateSection(max_new_tokens=24, temperature=0.0, backend="vllm", vllm_eager=True)
    engine = make_generator(g, tokenizer=tok, eos=eos, device="cpu", model_path=str(sft_model),
                            max_prompt_length=16)  # fmt: skip
    hf = HFGenerator(g, tokenizer=tok, eos=eos, device="cpu", model=model)
    prompts = [tok(t)["input_ids"] for t in ("the movie", "I think this", "a")]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    before = engine.sample(prompts, None).response_ids
    engine.load_weights(model)
    after = hf.sample(prompts, None)
    assert not torch.equal(before, after.response_ids)
    assert torch.equal(engine.sample(prompts, None).response_ids, after.response_ids)
    import peft

    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    engine.load_weights(lora)
    merged = HFGenerator(g, tokenizer=tok, eos=eos, device="cpu", model=lora).sample(prompts, None)
    assert not torch.equal(merged.response_ids, after.response_ids)
    assert torch.equal(engine.sample(prompts, None).response_ids, merged.response_ids)
    engine.close()


@vllm_test
def test_chatml_replies_stop_at_im_end(qwen2_task: Path) -> None:
    """A Qwen2 with a ChatML template: vLLM replies end at <|im_end|> (kept in the response,
    nothing after it), sampled and greedy, and greedy ones equal transformers'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rto.config.sections import GenerateSection
    from rto.models.generate import HFGenerator, decode_responses, stop_ids
    from rto.models.generators import make_generator

    folder = qwen2_task / "base_model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = stop_ids(tok, model)
    assert im_end in eos
    prompts = [tok(f"review {i}:")["input_ids"] for i in range(32)]
    with torch.no_grad():  # an untrained model: make <|im_end|> likely, as a chat model's is
        ids = torch.tensor([p[-1:] for p in prompts])
        h = model(ids, output_hidden_states=True).hidden_states[-1].mean((0, 1))
        top = (model.lm_head.weight @ h).max()
        model.lm_head.weight[im_end] = h * (top + 1.0) / h.dot(h)
    g = GenerateSection(max_new_tokens=30, temperature=1.0, backend="vllm", vllm_eager=True)
    engine = make_generator(g, tokenizer=tok, eos=eos, device="cpu", model=model,
                            model_path=str(folder), max_prompt_length=16)  # fmt: skip
    engine.load_weights(model)
    s = engine.sample(prompts, list(range(32)))
    ended = ~s.truncated
    assert 0 < int(ended.sum()) < 32
    last = []
    for ids, mask, done in zip(s.response_ids.tolist(), s.response_mask.tolist(), ended.tolist()):
        kept = [t for t, m in zip(ids, mask) if m]
        assert (kept[-1] in eos) == done and not set(kept[:-1]) & set(eos)
        last.append(kept[-1])
    assert last.count(im_end) > 0  # <|im_end|> ends replies (the EOS may too)
    assert all("<|im_end|>" not in t for t in decode_responses(tok, s, eos))
    g.temperature = 0.0
    hf = HFGenerator(g, tokenizer=tok, eos=eos, device="cpu", model=model).sample(prompts, None)
    assert torch.equal(engine.sample(prompts, None).response_ids, hf.response_ids)
    engine.close()


@vllm_test
@pytest.mark.parametrize("preset", ["rto"])  # ppo's rollout is rto's without the DPO model
def test_a_killed_vllm_run_resumes_to_the_uninterrupted_one(
    preset: str, sft_model: Path, reward_model: Path, dpo_model: Path, tiny_task: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """rto end to end with vLLM rollouts, killed (SIGKILL) after update 2 of 3 and
    resumed: each response is a function of its seed, the engine gets the resumed policy's
    weights, so the run ends with the uninterrupted run's weights."""
    from test_rl_stage import same_weights

    common = ["--preset", preset, "--train.max_steps", "3", "--train.save_every", "1", *VLLM]

    def args(out: str) -> list:
        return rl_args(tiny_task, sft_model, reward_model, dpo_model, tmp_path / out, *common)

    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    for out, extra in (("full", {}), ("cut", {"RTO_FAULT": "kill_after_step:2"})):
        done = rto_subprocess(*args(out), env={**env, **extra})
        assert done.returncode == (0 if out == "full" else -9), done.stderr[-2000:]
    resumed = rto_subprocess(*args("cut"), "--resume", env=env)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-2000:]
    assert same_weights(tmp_path / "full", tmp_path / "cut")
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "rollout/sampler_gap_abs" in r] == [1, 2, 3]


@vllm_test
def test_an_architecture_vllm_cannot_serve_is_a_clear_error(
    sft_model: Path, tiny_task: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    odd = tmp_path / "odd_model"
    shutil.copytree(sft_model, odd)
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["NoSuchArchitectureForCausalLM"]  # transformers reads model_type
    (odd / "config.json").write_text(json.dumps(config))
    out = tmp_path / "eval"
    assert rto(*eval_args(tiny_task, out, f"odd={odd}", "--eval.num_prompts", "8", *VLLM)) == 2
    err = capsys.readouterr().err
    assert f"vLLM cannot serve the model {odd}" in err and "generate.backend hf" in err
    assert "Traceback" not in err and not out.exists()


@vllm_test
def test_two_processes_each_with_an_engine_write_the_same_pairs_as_one(
    sft_model: Path, tiny_task: Path, tmp_path: Path
) -> None:
    """Under torchrun each process runs its own in-process engine on its share of the prompts;
    every response is sampled with its own seed, so the pairs equal one process's, byte for byte."""
    from test_distributed import torchrun

    def pairs(out: Path) -> list[str]:
        return ["pairs", "--out", out, "--model.path", sft_model, "--data.path", tiny_task / "prompts_train.jsonl",
                "--data.max_rows", "32", "--data.max_prompt_length", "32", "--gold_reward", "sentiment",
                "--generate.max_new_tokens", "24", "--log.progress", "false", *VLLM]  # fmt: skip

    one = rto_subprocess(*pairs(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(*pairs(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-2000:]
    text = (tmp_path / "one" / "pairs_train.jsonl").read_text()
    assert text == (tmp_path / "two" / "pairs_train.jsonl").read_text() and text.count("\n") > 5


@vllm_test
def test_zero3_gathers_the_policy_into_each_processs_engine(
    sft_model: Path, reward_model: Path, dpo_model: Path, tiny_task: Path, tmp_path: Path
) -> None:
    """Under DeepSpeed ZeRO-3 on 2 processes no process holds the whole policy: its weights are
    gathered once per rollout and loaded into each process's engine. After 2 updates the run's
    greedy held-out replies (vLLM) equal what transformers replies with the saved policy."""
    pytest.importorskip("deepspeed")
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "rl"
    evals = ["--eval.prompts", tiny_task / "prompts_eval.jsonl", "--eval.gold_reward", "sentiment",
             "--eval.num_prompts", "32", "--generate.temperature", "0"]  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "configs" / "accelerate" / "deepspeed_zero3.yaml"), "--num_processes", "2",
           "--main_process_port", "0", "-m", "rto",
           *map(str, rl_args(tiny_task, sft_model, reward_model, dpo_model, out, "--train.max_steps", "2",
                             "--train.lr", "3e-3", *evals, *VLLM))]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed_type"] == "DEEPSPEED" and summary["world_size"] == 2
    rto_ok(*eval_args(tiny_task, tmp_path / "ev", f"rl={out},sft={sft_model}", "--eval.num_prompts", "32",
                      "--generate.temperature", "0", "--generate.max_new_tokens", "32"))  # fmt: skip
    rl_hf, sft_hf = records(tmp_path / "ev", "rl"), records(tmp_path / "ev", "sft")
    assert [r["response"] for r in rl_hf] != [r["response"] for r in sft_hf]
    mean = lambda rs, k: sum(float(r[k]) for r in rs) / len(rs)  # noqa: E731
    assert summary["eval/length_mean"] == pytest.approx(mean(rl_hf, "length"), abs=1e-9)
    assert summary["eval/gold_reward_mean"] == pytest.approx(mean(rl_hf, "gold_reward"), abs=1e-9)


def test_a_lora_rank_vllm_cannot_serve_names_the_keys() -> None:
    from rto.errors import ConfigError
    from rto.models.vllm_engine import served_rank

    assert [served_rank(r) for r in (1, 8, 9, 64, 300)] == [8, 8, 16, 64, 320]
    with pytest.raises(ConfigError, match=r"'lora.r' \(600\).*generate.vllm_lora merged"):
        served_rank(600)


@vllm_test
def test_a_model_the_engine_loads_but_cannot_run_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A Llama with heads of 16 dimensions: vLLM's CPU attention has no kernel for it, which
    shows only when the engine first generates; said in one line naming the model."""
    task = tmp_path / "task"
    rto_ok("task", "sentiment", "--out", task, "--hidden_size", "32", "--num_heads", "2", "--num_layers", "1",
           "--num_sft", "50", "--num_sft_eval", "10", "--num_train_prompts", "16", "--num_eval_prompts", "10", "--vocab_size", "300")  # fmt: skip
    base = task / "base_model"
    out = tmp_path / "eval"
    code = rto(*eval_args(task, out, f"base={base}", "--eval.num_prompts", "8", *VLLM))
    err = capsys.readouterr().err
    if code == 0:
        pytest.skip("this vLLM build serves heads of 16 dimensions on this CPU")
    assert (
        code == 2 and f"vLLM cannot serve the model {base}" in err and "generate.backend hf" in err
    )
    assert "Traceback" not in err and not out.exists()
