"""generate.backend vllm: what a user sees when vLLM generates instead of transformers.

Every test but the first needs vLLM (`./install.sh vllm`), is marked `vllm` and skips with that
reason without it; CI runs them in a second environment (`pytest -m vllm`). Engines start eager
(`generate.vllm_eager`) so that each starts in seconds.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import rl_args, rto, rto_ok

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
@pytest.mark.slow  # needs the reward and DPO models: with -m vllm, not in CI's vLLM arm
def test_rl_syncs_the_trained_policy_into_the_engine(
    sft_model: Path, reward_model: Path, dpo_model: Path, tiny_task: Path, tmp_path: Path
) -> None:
    """After 2 RL updates, the run's own greedy held-out samples (vLLM, weights synced) equal
    what transformers samples greedily from the saved policy, and differ from the SFT model's."""
    evals = ["--eval.prompts", tiny_task / "prompts_eval.jsonl", "--eval.gold_reward", "sentiment",
             "--eval.num_prompts", "32", "--generate.temperature", "0"]  # fmt: skip
    out = tmp_path / "rl"
    rto_ok(*rl_args(tiny_task, sft_model, reward_model, dpo_model, out, "--train.max_steps", "2",
                    "--train.lr", "3e-3", *evals, *VLLM))  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    rto_ok(*eval_args(tiny_task, tmp_path / "ev", f"rl={out},sft={sft_model}", "--eval.num_prompts", "32",
                      "--generate.temperature", "0", "--generate.max_new_tokens", "32"))  # fmt: skip
    rl_hf, sft_hf = records(tmp_path / "ev", "rl"), records(tmp_path / "ev", "sft")
    assert [r["response"] for r in rl_hf] != [r["response"] for r in sft_hf]  # the updates show
    mean = lambda rs, k: sum(float(r[k]) for r in rs) / len(rs)  # noqa: E731
    assert summary["eval/length_mean"] == pytest.approx(mean(rl_hf, "length"), abs=1e-9)
    assert summary["eval/gold_reward_mean"] == pytest.approx(mean(rl_hf, "gold_reward"), abs=1e-9)


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
