"""LoRA (lora.r > 0) in sft, rm, dpo and rl: adapter folders that peft + transformers load alone,
merged models that equal base + adapter, gradient checkpointing and --resume as exact as for full
models, DPO's reference as the policy's base with the adapter off, adapter folders accepted
wherever a model path is, and clear errors when an adapter's base moved or changed. On the
built-in Llama, a GPT-2 (Conv1D layers, dropout) and a Qwen2 with a ChatML template."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rto.config.sections import LoraSection, ModelSection
from rto.config.stages import DPOConfig
from rto.data.tokenize import collate_pairs
from rto.errors import ConfigError, ModelError
from rto.models import lora
from rto.models.forward import TokenScorer, sequence_scores
from rto.models.load import load_causal_lm, load_sequence_scorer
from rto.stages.dpo import PreferenceObjective

from conftest import PREF_COMMON, rl_args, rto, rto_ok, rto_subprocess, sft_args

pytest.importorskip("peft")

QUIET = ["--log.progress", "false"]
LENGTHS = ["--data.max_length", "96", "--data.max_prompt_length", "48"]
IDS = torch.randint(5, 300, (3, 14), generator=torch.Generator().manual_seed(0))


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def scores(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return sequence_scores(TokenScorer(model), ids, torch.ones_like(ids))


def rto_causal_lm(folder: Path):
    return load_causal_lm(ModelSection(path=str(folder)), trainable=False)


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / lora.ADAPTER_WEIGHTS))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


def pref_args(task: Path, sft: Path, pairs: Path, out: Path, *extra: str) -> list[str]:
    return ["--out", out, "--model.path", sft, "--data.path", pairs / "pairs_train.jsonl",
            "--data.eval_path", pairs / "pairs_eval.jsonl", "--train.lr", "3e-3",
            "--train.batch_size", "16", "--train.micro_batch_size", "16", "--train.max_steps", "4",
            *PREF_COMMON, *extra]  # fmt: skip


# --------------------------------------------------------------------------- config and errors


@pytest.mark.parametrize("stage", ["rm", "dpo", "rl"])
def test_adapter_dropout_is_refused_where_every_role_runs_without_dropout(
    stage: str, capsys: pytest.CaptureFixture
) -> None:
    roles = ["--reward_model", "r", "--dpo_model", "p"] if stage == "rl" else []
    assert rto(stage, "--out", "x", "--model.path", "m", "--data.path", "d", *roles,
               "--lora.r", "4", "--lora.dropout", "0.1") == 2  # fmt: skip
    assert "'lora.dropout' (0.1) must be 0" in capsys.readouterr().err


def test_unknown_target_modules_name_the_layers_there_are(tiny_task: Path) -> None:
    section = ModelSection(path=str(tiny_task / "base_model"))
    with pytest.raises(ConfigError, match="lora.target_modules.*q_proj.*v_proj"):
        lora.add_adapter(load_causal_lm(section), section, LoraSection(r=4, target_modules=["qkv"]))


def test_missing_peft_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # what an environment without peft gives
    with pytest.raises(ModelError, match=r"pip install 'rto\[peft\]'"):
        lora.import_peft()


# --------------------------------------------------------------------------- on three architectures


@pytest.fixture(scope="module", params=["tiny_task", "gpt2_task", "qwen2_task"])
def lora_runs(request: pytest.FixtureRequest, pairs_data: Path, tmp_path_factory) -> dict:
    """sft (adapter, and the same run merged) -> pairs from the adapter -> rm, dpo (LoRA on the
    merged SFT model) -> rl (LoRA policy and critic; the reward and DPO adapters on the same
    base: one shared base) -> eval of adapter folders, a few steps each."""
    task = request.getfixturevalue(request.param)
    root = tmp_path_factory.mktemp(request.param + "_lora")
    prompts = task / "prompts_train.jsonl"
    sft = ["--model.path", task / "base_model", "--data.path", task / "sft_train.jsonl",
           "--data.eval_fraction", "0", "--data.max_rows", "640", "--train.lr", "1e-2",
           "--train.batch_size", "32", "--train.micro_batch_size", "32", "--train.max_steps", "8",
           "--lora.r", "8", *LENGTHS, *QUIET]  # fmt: skip
    rto_ok("sft", "--out", root / "sft_adapter", *sft)
    rto_ok("sft", "--out", root / "sft", *sft, "--lora.merge", "true")
    rto_ok("pairs", "--out", root / "pairs", "--model.path", root / "sft_adapter", "--data.path", prompts,
           "--data.max_rows", "32", "--data.max_prompt_length", "48", "--gold_reward", "sentiment",
           "--generate.max_new_tokens", "64", *QUIET)  # fmt: skip
    rto_ok("rm", *pref_args(task, root / "sft", pairs_data, root / "rm", "--lora.r", "4"))
    rto_ok("dpo", *pref_args(task, root / "sft", pairs_data, root / "dpo", "--lora.r", "4"))
    rto_ok("rl", "--out", root / "rl", "--preset", "rto", "--model.path", root / "sft",
           "--reward_model", root / "rm", "--dpo_model", root / "dpo", "--data.path", prompts,
           "--data.max_prompt_length", "48", "--rl.rollout_batch_size", "16", "--train.batch_size", "16",
           "--train.micro_batch_size", "8", "--train.lr", "1e-3", "--train.max_steps", "2",
           "--generate.max_new_tokens", "24", "--lora.r", "4", "--save_critic", "true", *QUIET)  # fmt: skip
    rto_ok("eval", "--out", root / "eval", "--policies", f"sft={root / 'sft_adapter'},rto={root / 'rl'}",
           "--ref_model", root / "sft_adapter", "--reward_model", root / "rm",
           "--eval.prompts", task / "prompts_eval.jsonl", "--eval.num_prompts", "8",
           "--data.max_prompt_length", "48", "--generate.max_new_tokens", "24", *QUIET)  # fmt: skip
    return {"task": task, "root": root}


def test_lora_outputs_are_adapter_folders_on_every_linear_layer(lora_runs: dict) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    root = lora_runs["root"]
    for stage in ("sft_adapter", "rm", "dpo", "rl", "rl/critic"):
        files = {p.name for p in (root / stage).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "lora_base.json",
                "tokenizer_config.json"} <= files, stage  # fmt: skip
        assert "model.safetensors" not in files and "config.json" not in files, stage
    base = AutoModelForCausalLM.from_pretrained(lora_runs["task"] / "base_model")
    linear = {name for name, m in base.named_modules()
              if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not base.get_output_embeddings()}  # fmt: skip
    adapted = {k.split(".lora_A")[0].removeprefix("base_model.model.")
               for k in adapter_weights(root / "sft_adapter") if ".lora_A" in k}  # fmt: skip
    assert adapted == linear  # GPT-2's Conv1D layers included, the output layer left alone
    trained = adapter_weights(root / "sft_adapter")
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # B starts at 0
    record = json.loads((root / "rm" / "lora_base.json").read_text())
    assert record["score_head"] and record["relative"] == "../sft" and record["fingerprint"]


def test_adapters_load_with_peft_alone_and_equal_the_merged_model(
    lora_runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    root = lora_runs["root"]
    monkeypatch.chdir(tmp_path)  # the base is found from any working directory
    for stage in ("sft_adapter", "dpo", "rl"):
        alone = AutoPeftModelForCausalLM.from_pretrained(root / stage).eval()
        assert torch.allclose(logits(alone), logits(rto_causal_lm(root / stage)), atol=1e-5), stage
    merged = AutoModelForCausalLM.from_pretrained(root / "sft").eval()  # --lora.merge true
    adapter = AutoPeftModelForCausalLM.from_pretrained(root / "sft_adapter").eval()
    assert torch.allclose(logits(merged), logits(adapter), atol=1e-5)
    assert not torch.allclose(
        logits(merged), logits(rto_causal_lm(lora_runs["task"] / "base_model")), atol=1e-3
    )


def test_reward_model_adapter_carries_its_score_head(lora_runs: dict) -> None:
    from peft import AutoPeftModelForSequenceClassification

    rm = lora_runs["root"] / "rm"
    assert "base_model.model.score.weight" in adapter_weights(rm)
    alone = AutoPeftModelForSequenceClassification.from_pretrained(rm, num_labels=1).eval()
    ours = load_sequence_scorer(ModelSection(path=str(rm)), str(rm), trainable=False, require_head=True, role="reward model")  # fmt: skip
    expected = torch.cat([alone(input_ids=row[None]).logits[:, 0] for row in IDS]).detach()
    assert torch.allclose(scores(ours), expected, atol=1e-5)
    assert (rm / "reward_stats.json").is_file()


def test_rl_with_lora_adapters_for_every_role_on_one_shared_base(lora_runs: dict) -> None:
    root = lora_runs["root"]
    rows = [json.loads(x) for x in (root / "rl" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "rollout/kl" in r)
    # the new adapter starts at zero: the policy is exactly the reference, the ratio exactly 1
    assert first["rollout/kl"] == 0.0 and first["policy/approx_kl"] == 0.0
    # the DPO model and the reward model are adapters on the policy's base: one shared base,
    # the critic an adapter on it (started as a copy of the reward model's adapter and head)
    assert json.loads((root / "rl" / "summary.json").read_text())["roles"] == "one shared base"
    critic = json.loads((root / "rl" / "critic" / "lora_base.json").read_text())
    assert critic["score_head"] and critic["relative"] == "../../sft"
    result = json.loads((root / "eval" / "eval.json").read_text())
    assert set(result["methods"]) == {"sft", "rto"} and "kl_mean" in result["methods"]["rto"]
    assert json.loads((root / "pairs" / "summary.json").read_text())


# --------------------------------------------------------------------------- the engine with LoRA


def test_gradient_checkpointing_gives_the_same_adapter(tiny_task: Path, tmp_path: Path) -> None:
    common = ["--train.max_steps", "3", "--data.max_rows", "200", "--lora.r", "4"]
    rto_ok(*sft_args(tiny_task, tmp_path / "plain", *common))
    rto_ok(*sft_args(tiny_task, tmp_path / "gc", *common, "--model.gradient_checkpointing", "true"))
    a, b = adapter_weights(tmp_path / "plain"), adapter_weights(tmp_path / "gc")
    assert same_tensors(a, b, atol=1e-6) and not same_tensors(a, {k: 0 * v for k, v in a.items()})


def test_killed_lora_run_resumes_to_the_same_adapter_from_small_checkpoints(
    tiny_task: Path, tmp_path: Path
) -> None:
    common = ["--train.max_steps", "8", "--train.save_every", "4", "--data.max_rows", "400",
              "--lora.r", "4"]  # fmt: skip
    full = rto_subprocess(*sft_args(tiny_task, tmp_path / "full", *common))
    assert full.returncode == 0, full.stderr
    killed = rto_subprocess(*sft_args(tiny_task, tmp_path / "cut", *common),
                            env={"RTO_FAULT": "kill_after_step:6"})  # fmt: skip
    assert killed.returncode == -9
    saved = load_file(str(tmp_path / "cut" / "checkpoints" / "step-4" / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # the frozen base is not in checkpoints
    resumed = rto_subprocess(*sft_args(tiny_task, tmp_path / "cut", *common, "--resume"))
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    assert same_tensors(adapter_weights(tmp_path / "full"), adapter_weights(tmp_path / "cut"))


def test_rm_head_trains_in_float32_on_a_bfloat16_base(
    tiny_task: Path, sft_model: Path, pairs_data: Path, tmp_path: Path
) -> None:
    """What model.dtype auto gives a LoRA base on a GPU: the frozen base in bfloat16, the score
    head (trained whole) in float32, so that small updates are not rounded away."""
    out = tmp_path / "rm"
    rto_ok("rm", *pref_args(tiny_task, sft_model, pairs_data, out, "--lora.r", "4",
                            "--model.dtype", "bfloat16", "--train.max_steps", "2"))  # fmt: skip
    head = adapter_weights(out)["base_model.model.score.weight"]
    assert head.dtype == torch.float32 and torch.isfinite(head).all()


# --------------------------------------------------------------------------- DPO's reference


def test_dpo_reference_with_the_adapter_off_equals_a_separate_reference() -> None:
    """The LoRA policy's base with its adapter disabled is the SFT model it started from: every
    DPO-family loss is the same with it as with a separate copy of that model."""
    from test_preference import PAIRS, tiny_lm

    sft = tiny_lm(0)
    section = ModelSection(path="sft")
    policy, _ = lora.add_adapter(copy.deepcopy(sft), section, LoraSection(r=4))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:  # a trained adapter: the policy differs from the reference
                p.normal_(std=0.2)
    batch = collate_pairs(PAIRS, 0)
    for kind in ("dpo", "ipo", "tdpo"):
        cfg = DPOConfig(loss=kind)
        with torch.no_grad():
            shared = PreferenceObjective(cfg, lora.AdapterOff(policy))(policy, batch)
            separate = PreferenceObjective(cfg, sft)(policy, batch)
        assert float(shared[0]) == pytest.approx(float(separate[0]), rel=1e-6, abs=1e-7), kind
        assert shared[1]["rewards/chosen"] != 0.0  # the adapter did change the policy


def test_dpo_stage_with_lora_needs_no_reference_copy(
    tiny_task: Path, sft_model: Path, pairs_data: Path, tmp_path: Path
) -> None:
    copy_of_sft = tmp_path / "sft_copy"
    shutil.copytree(sft_model, copy_of_sft)  # another path: loaded as a separate model
    rto_ok(
        "dpo", *pref_args(tiny_task, sft_model, pairs_data, tmp_path / "shared", "--lora.r", "4")
    )
    rto_ok("dpo", *pref_args(tiny_task, sft_model, pairs_data, tmp_path / "separate", "--lora.r", "4",
                             "--ref_model", copy_of_sft))  # fmt: skip
    info = json.loads((tmp_path / "shared" / "dpo.json").read_text())
    assert info["reference"].startswith("the policy's base")
    assert same_tensors(
        adapter_weights(tmp_path / "shared"), adapter_weights(tmp_path / "separate"), atol=1e-6
    )


# --------------------------------------------------------------------------- where the base is


@pytest.fixture(scope="module")
def adapter_run(tiny_task: Path, sft_model: Path, pairs_data: Path, tmp_path_factory) -> Path:
    """A run folder as a pipeline leaves it: run/sft (a full model) and run/dpo (an adapter)."""
    run = tmp_path_factory.mktemp("adapter_run") / "run"
    shutil.copytree(sft_model, run / "sft")
    rto_ok("dpo", *pref_args(tiny_task, run / "sft", pairs_data, run / "dpo", "--lora.r", "4",
                             "--train.max_steps", "2"))  # fmt: skip
    return run


def test_a_moved_run_folder_still_finds_the_base(adapter_run: Path, tmp_path: Path) -> None:
    before = logits(rto_causal_lm(adapter_run / "dpo"))
    moved = tmp_path / "moved"
    shutil.copytree(adapter_run, moved)
    shutil.move(str(adapter_run / "sft"), str(tmp_path / "sft_elsewhere"))  # the old place empty
    try:
        assert torch.equal(logits(rto_causal_lm(moved / "dpo")), before)
        shutil.rmtree(moved / "sft")
        with pytest.raises(ModelError, match="trained on the base model .* not there any more"):
            rto_causal_lm(moved / "dpo")
    finally:
        shutil.move(str(tmp_path / "sft_elsewhere"), str(adapter_run / "sft"))


def test_an_adapter_refuses_a_base_that_changed(
    adapter_run: Path, tiny_task: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    changed = tmp_path / "run"
    shutil.copytree(adapter_run, changed)
    for f in ("model.safetensors", "config.json"):  # the SFT run replaced by another model
        shutil.copy(tiny_task / "base_model" / f, changed / "sft" / f)
    with pytest.raises(ModelError, match="trained on a different model"):
        rto_causal_lm(changed / "dpo")
    # and `rto rl` stops with that error instead of training with a wrong DPO model
    code = rto("rl", "--out", tmp_path / "rl", "--preset", "rto", "--model.path", changed / "sft",
               "--rl.score.coef", "0", "--rl.critic_init", "policy", "--dpo_model", changed / "dpo",
               "--data.path", tiny_task / "prompts_train.jsonl", "--rl.rollout_batch_size", "16",
               "--train.batch_size", "16", *QUIET)  # fmt: skip
    assert code == 2
    assert (
        f"adapter at {changed / 'dpo'} was trained on a different model" in capsys.readouterr().err
    )


def test_lora_on_an_adapter_folder_stacks_on_the_merged_base(
    adapter_run: Path, tiny_task: Path, pairs_data: Path, tmp_path: Path
) -> None:
    """A stage whose model.path is an adapter folder trains on base + that adapter; its own
    adapter records the folder as its base, and loads as the chain (peft alone: merge the first,
    then add the second)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dpo2"
    rto_ok("dpo", *pref_args(tiny_task, adapter_run / "dpo", pairs_data, out, "--lora.r", "4",
                             "--train.max_steps", "2"))  # fmt: skip
    assert json.loads((out / "lora_base.json").read_text())["base_model"] == str(
        adapter_run / "dpo"
    )
    first = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(adapter_run / "sft"), adapter_run / "dpo"
    ).merge_and_unload()
    alone = PeftModel.from_pretrained(first, out).eval()
    assert torch.allclose(logits(alone), logits(rto_causal_lm(out)), atol=1e-5)


def test_killed_lora_rl_run_resumes_to_the_same_policy_and_critic(
    tiny_task: Path, sft_model: Path, reward_model: Path, dpo_model: Path, tmp_path: Path
) -> None:
    common = ["--preset", "rto", "--train.max_steps", "4", "--train.save_every", "2",
              "--lora.r", "4", "--save_critic", "true"]  # fmt: skip
    for out, env in (("full", {}), ("cut", {"RTO_FAULT": "kill_after_step:3"})):
        done = rto_subprocess(*rl_args(tiny_task, sft_model, reward_model, dpo_model, tmp_path / out, *common), env=env)  # fmt: skip
        assert done.returncode == (0 if out == "full" else -9), done.stderr
    resumed = rto_subprocess(*rl_args(tiny_task, sft_model, reward_model, dpo_model, tmp_path / "cut", *common, "--resume"))  # fmt: skip
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    for folder in (Path("."), Path("critic")):
        full, cut = tmp_path / "full" / folder, tmp_path / "cut" / folder
        assert same_tensors(adapter_weights(full), adapter_weights(cut)), folder
