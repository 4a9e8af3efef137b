"""The shared-base RTO (`rto rl --lora.r N` with the DPO model and the reward model given as
adapters on the policy's base): one frozen base serves all five roles, and each role computes
what the separate model it stands for computes. On the built-in Llama, a GPT-2 (Conv1D layers)
and a Qwen2; the runs on the tiny Llama, a few steps each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rto.config.sections import LoraSection, ModelSection
from rto.config.stages import RLConfig
from rto.files import write_json
from rto.models import lora
from rto.models.load import load_causal_lm, load_sequence_scorer, load_tokenizer
from rto.models.reward_model import load_reward_model
from rto.models.trainable import make_trainable
from rto.rl.roles import direct, policy_logprobs
from rto.rl.shared_base import SharedBase, load_shared_base

from conftest import rl_args, rto, rto_subprocess

pytest.importorskip("peft")

QUIET = ["--log.progress", "false"]


def make_adapter(base: Path, out: Path, *, score_head: bool, seed: int) -> Path:
    """An adapter folder on `base` as `rto dpo` / `rto rm --lora.r 4` write one, with random
    (non-zero) adapter weights and score head: no training needed to tell roles apart."""
    from accelerate import Accelerator

    section, settings = ModelSection(path=str(base)), LoraSection(r=4)
    if score_head:
        hf = load_sequence_scorer(section, str(base), trainable=True, require_head=False,
                                  role="reward model")  # fmt: skip
    else:
        hf = load_causal_lm(section)
    trainable = make_trainable(hf, section, settings, score_head=score_head)
    model = trainable.model
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ".score." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    trainable.save(model, load_tokenizer(section), out, Accelerator(cpu=True), settings)
    if score_head:
        write_json(out / "reward_stats.json", {"mean": 0.0, "std": 1.0, "n": 0})
    return out


def rl_config(base: Path, dpo: Path, rm: Path, **extra) -> RLConfig:
    return RLConfig(model=ModelSection(path=str(base)), dpo_model=str(dpo), reward_model=str(rm),
                    lora=LoraSection(r=4), **extra)  # fmt: skip


def batch(vocab: int) -> dict[str, torch.Tensor]:
    """The RL layout: prompts left-padded, responses right-padded."""
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(5, vocab, (3, 6), generator=g)
    response_ids = torch.randint(5, vocab, (3, 5), generator=g)
    prompt_mask = torch.tensor([[1] * 6, [0, 0] + [1] * 4, [0] + [1] * 5])
    response_mask = torch.tensor([[1] * 5, [1] * 3 + [0, 0], [1] * 4 + [0]])
    return {"prompt_ids": prompt_ids * prompt_mask, "prompt_mask": prompt_mask,
            "response_ids": response_ids * response_mask, "response_mask": response_mask}  # fmt: skip


@pytest.fixture(scope="module", params=["tiny_task", "gpt2_task", "qwen2_task"])
def shared(request: pytest.FixtureRequest, tmp_path_factory) -> dict:
    task = request.getfixturevalue(request.param)
    root = tmp_path_factory.mktemp(request.param + "_shared")
    base = task / "base_model"
    dpo = make_adapter(base, root / "dpo", score_head=False, seed=1)
    rm = make_adapter(base, root / "rm", score_head=True, seed=2)
    cfg = rl_config(base, dpo, rm)
    roles = load_shared_base(cfg, load_tokenizer(cfg.model), use_dpo=True, use_rm=True,
                             critic_from=str(rm), device=torch.device("cpu"))  # fmt: skip
    return {"base": base, "dpo": dpo, "rm": rm, "roles": roles,
            "batch": batch(roles.adapters.hf.config.vocab_size)}  # fmt: skip


def test_dpo_log_ratio_on_the_shared_base_equals_the_merged_dpo_models(shared: dict) -> None:
    roles, b = shared["roles"], shared["batch"]
    section = ModelSection(path=str(shared["base"]))
    merged = load_causal_lm(section, path=str(shared["dpo"]), trainable=False)
    sft = load_causal_lm(section, trainable=False)
    with torch.no_grad():
        shared_ratio = roles.logprobs("dpo", b) - roles.logprobs("ref", b)
        separate_ratio = (policy_logprobs(direct(merged), b, 1.0, roles.passes)[0]
                          - policy_logprobs(direct(sft), b, 1.0, roles.passes)[0])  # fmt: skip
    assert torch.allclose(shared_ratio, separate_ratio, atol=1e-5)
    assert shared_ratio.abs().max() > 1e-3  # the adapter does change the model


def test_reference_with_adapters_off_is_the_sft_model(shared: dict) -> None:
    roles, b = shared["roles"], shared["batch"]
    sft = load_causal_lm(ModelSection(path=str(shared["base"])), trainable=False)
    with torch.no_grad():
        ref = roles.logprobs("ref", b)
        assert torch.equal(ref, policy_logprobs(direct(sft), b, 1.0, roles.passes)[0])
        # a new policy adapter starts at zero: the policy is the reference, exactly
        assert torch.equal(roles.logprobs("policy", b), ref)


def test_reward_score_through_adapter_and_head_equals_the_merged_reward_models(
    shared: dict,
) -> None:
    roles, b = shared["roles"], shared["batch"]
    tokenizer = load_tokenizer(ModelSection(path=str(shared["base"])))
    merged = load_reward_model(ModelSection(path=str(shared["base"])), str(shared["rm"]), tokenizer,
                               chat_prompts="auto", device="cpu")  # fmt: skip
    args = (b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"])
    with torch.no_grad():
        assert torch.allclose(roles.score(b), merged.score(*args), atol=1e-5)
        # the critic starts as the reward model (adapter and head), read at every position
        ids = torch.cat([b["prompt_ids"], b["response_ids"]], 1)
        mask = torch.cat([b["prompt_mask"], b["response_mask"]], 1)
        assert torch.allclose(roles.critic(ids, mask), merged.scorer(ids, mask), atol=1e-5)


def test_adapters_of_the_shared_base_save_as_folders_peft_loads_alone(
    shared: dict, tmp_path: Path
) -> None:
    """What `rto rl --lora.r` writes from the shared base: an adapter folder per trained role
    (the critic's with its head, as a sequence classifier), or with lora.merge a plain model."""
    from accelerate import Accelerator
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForCausalLM

    roles, b = shared["roles"], shared["batch"]
    adapters, accelerator = roles.adapters, Accelerator(cpu=True)
    tokenizer = load_tokenizer(ModelSection(path=str(shared["base"])))
    adapters.save("critic", tmp_path / "critic", tokenizer, accelerator, head=roles.critic.head)
    adapters.save_merged("dpo", tmp_path / "dpo_merged", tokenizer, accelerator)
    ids = torch.cat([b["prompt_ids"], b["response_ids"]], 1)[:, :8]  # unpadded rows
    with torch.no_grad():
        alone = AutoPeftModelForSequenceClassification.from_pretrained(
            tmp_path / "critic", num_labels=1
        )
        expected = roles.critic(ids, torch.ones_like(ids))[:, -1]
        assert torch.allclose(alone.eval()(input_ids=ids).logits[:, 0], expected, atol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo_merged").eval()

        def logits(model, ids):  # noqa: ANN001, ANN202  (an op: the role runs it with its adapter)
            return model(input_ids=ids).logits

        dpo = roles.dpo(logits, ids)
        assert torch.allclose(merged(input_ids=ids).logits, dpo, atol=1e-5)
        # merging wrote a copy: the shared base itself is unmerged again
        assert torch.equal(roles.ref(logits, ids), load_causal_lm(
            ModelSection(path=str(shared["base"])), trainable=False)(input_ids=ids).logits)  # fmt: skip
    assert json.loads((tmp_path / "critic" / "lora_base.json").read_text())["score_head"]


def test_a_critic_started_from_the_policy_gets_a_new_adapter_and_value_head(
    tiny_task: Path, tmp_path: Path
) -> None:
    base = tiny_task / "base_model"
    rm = make_adapter(base, tmp_path / "rm", score_head=True, seed=7)
    cfg = rl_config(base, rm, rm)
    roles = load_shared_base(cfg, load_tokenizer(cfg.model), use_dpo=False, use_rm=True,
                             critic_from=str(base), device=torch.device("cpu"))  # fmt: skip
    policy, critic = roles.trained_parameters()
    assert len(critic) == len(policy) + 1 and all(p.requires_grad for p in critic)
    assert not torch.equal(roles.critic.head.weight, roles.reward_model.scorer.head.weight)
    b = batch(300)
    roles.values(b).sum().backward()
    assert roles.critic.head.weight.grad.abs().sum() > 0
    assert "dpo" not in roles.adapters.trains and not roles.has("dpo")


def test_gradients_reach_both_trained_adapters_and_nothing_else(shared: dict) -> None:
    roles: SharedBase = shared["roles"]
    b = shared["batch"]
    policy_params, critic_params = roles.trained_parameters()
    trained = {id(p) for p in policy_params + critic_params}
    peft_model = roles.adapters.model
    peft_model.zero_grad(set_to_none=True)
    roles.critic.zero_grad(set_to_none=True)
    with torch.no_grad():  # the frozen roles take their turns in between, as in scoring
        roles.logprobs("dpo", b), roles.score(b)
    loss = roles.logprobs("policy", b).sum() + roles.values(b).sum()
    with torch.no_grad():
        roles.logprobs("ref", b)
    loss.backward()
    everything = list(peft_model.parameters()) + list(roles.critic.parameters())
    assert all(p.grad is not None for p in policy_params + critic_params)
    # a new adapter's B is 0, so A gets no gradient yet; B does, and every part of the critic
    # (a copy of the reward model's adapter, and the head)
    assert all(
        p.grad.abs().sum() > 0 for p in roles.adapters.parameters("policy") if p.shape[0] > 4
    )
    assert all(p.grad.abs().sum() > 0 for p in critic_params)
    assert all(p.grad is None and not p.requires_grad for p in everything if id(p) not in trained)
    assert len(roles.adapters.parameters("policy")) == len(roles.adapters.parameters("dpo")) > 0
    peft_model.zero_grad(set_to_none=True)
    roles.critic.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- `rto rl` on one base


@pytest.fixture(scope="module")
def on_sft(sft_model: Path, tmp_path_factory) -> dict:
    """A DPO model and a reward model as adapter folders on the SFT model."""
    root = tmp_path_factory.mktemp("on_sft")
    return {"dpo": make_adapter(sft_model, root / "dpo", score_head=False, seed=3),
            "rm": make_adapter(sft_model, root / "rm", score_head=True, seed=4)}  # fmt: skip


SHARED_RUN = ["--lora.r", "4", "--train.max_steps", "2", "--rl.rollout_batch_size", "16",
              "--train.batch_size", "16", "--generate.max_new_tokens", "16",
              "--rl.score.normalization", "running", "--save_critic", "true"]  # fmt: skip


def metric_rows(folder: Path) -> list[dict]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def adapters_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / lora.ADAPTER_WEIGHTS))


def test_beta1_zero_on_the_shared_base_is_shared_base_ppo(
    tiny_task: Path, sft_model: Path, on_sft: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = lambda out, *extra: rto(*rl_args(tiny_task, sft_model, on_sft["rm"], on_sft["dpo"],  # noqa: E731
                                           tmp_path / out, *SHARED_RUN, *extra))  # fmt: skip
    assert run("rto0", "--preset", "rto", "--rl.dpo_reward.scale", "0") == 0
    assert "[rto] roles: one shared base" in capsys.readouterr().err
    assert run("ppo", "--preset", "ppo") == 0
    for folder in (Path("."), Path("critic")):
        a, b = adapters_of(tmp_path / "rto0" / folder), adapters_of(tmp_path / "ppo" / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    assert metric_rows(tmp_path / "rto0") == metric_rows(tmp_path / "ppo")
    summary = json.loads((tmp_path / "ppo" / "summary.json").read_text())
    assert summary["roles"] == "one shared base"


def test_shared_base_rto_scores_its_first_rollout_as_separate_models_do(
    tiny_task: Path, sft_model: Path, on_sft: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The same RTO run with the reference given as a copy of the SFT model, which puts every
    role in a separate model (the adapters merged): the first rollout (sampled from the same
    policy) gets the same DPO rewards, scores, values and returns."""
    import shutil

    shutil.copytree(sft_model, tmp_path / "sft_copy")
    common = [*SHARED_RUN, "--preset", "rto", "--train.max_steps", "1"]
    for out, extra in (("shared", []), ("separate", ["--ref_model", tmp_path / "sft_copy"])):
        args = rl_args(tiny_task, sft_model, on_sft["rm"], on_sft["dpo"], tmp_path / out)
        assert rto(*args, *common, *extra) == 0
    err = capsys.readouterr().err
    assert "[rto] roles: one shared base" in err and "[rto] roles: separate models" in err
    shared, separate = metric_rows(tmp_path / "shared")[-1], metric_rows(tmp_path / "separate")[-1]
    for key in ("rollout/dpo_reward_sum", "rollout/score", "rollout/return", "reward/score_sum",
                "value/explained_variance", "rollout/response_length"):  # fmt: skip
        assert shared[key] == pytest.approx(separate[key], rel=1e-4, abs=1e-7), key
    assert abs(shared["rollout/dpo_reward_sum"]) > 1e-5


def test_killed_shared_base_run_resumes_to_the_same_adapters(
    tiny_task: Path, sft_model: Path, on_sft: dict, tmp_path: Path
) -> None:
    common = [*SHARED_RUN, "--preset", "rto", "--train.max_steps", "3", "--train.save_every", "1"]
    args = lambda out, *extra: rl_args(tiny_task, sft_model, on_sft["rm"], on_sft["dpo"],  # noqa: E731
                                       tmp_path / out, *common, *extra)  # fmt: skip
    for out, env in (("full", {}), ("cut", {"RTO_FAULT": "kill_after_step:2"})):
        done = rto_subprocess(*args(out), env=env)
        assert done.returncode == (0 if out == "full" else -9), done.stderr
    saved = load_file(str(tmp_path / "cut" / "checkpoints" / "step-2" / "model.safetensors"))
    # the checkpoint holds what trains: the policy's and the critic's adapters, the value head
    assert saved and all(
        ".policy." in k or ".critic." in k or k == "critic.head.weight" for k in saved
    )
    assert any(".critic." in k for k in saved) and "critic.head.weight" in saved
    resumed = rto_subprocess(*args("cut", "--resume"))
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    for folder in (Path("."), Path("critic")):
        a, b = adapters_of(tmp_path / "full" / folder), adapters_of(tmp_path / "cut" / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    critic = json.loads((tmp_path / "full" / "critic" / "lora_base.json").read_text())
    assert critic["score_head"] and Path(critic["base_model"]) == sft_model.resolve()


def test_the_dpo_adapter_learns_online_on_the_shared_base(
    tiny_task: Path, sft_model: Path, on_sft: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """rl.online_dpo.enabled with the DPO model an adapter of the shared base: at a
    learning rate of 0 the run is the frozen one and the saved adapter the given one, bit for
    bit; learning, only the DPO adapter moves apart from the policy's, it stays out of the
    policy's checkpoints, and a killed run resumes to the uninterrupted one."""
    common = [*SHARED_RUN, "--preset", "rto_grpo", "--rl.samples_per_prompt", "2",
              "--rl.rollout_batch_size", "8", "--train.max_steps", "3"]  # fmt: skip
    args = lambda out, *extra: rl_args(tiny_task, sft_model, on_sft["rm"], on_sft["dpo"],  # noqa: E731
                                       tmp_path / out, *common, *extra)  # fmt: skip
    online = ["--rl.online_dpo.enabled", "true"]
    assert rto(*args("frozen")) == 0
    assert rto(*args("zero", *online, "--rl.online_dpo.lr", "0")) == 0
    assert "[rto] roles: one shared base" in capsys.readouterr().err
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("source/")} for r in rows]  # noqa: E731
    assert strip(metric_rows(tmp_path / "zero")) == strip(metric_rows(tmp_path / "frozen"))
    given, zero = adapters_of(on_sft["dpo"]), adapters_of(tmp_path / "zero" / "token_reward_model")
    assert given.keys() == zero.keys() and all(torch.equal(given[k], zero[k]) for k in given)

    learn = [*online, "--rl.online_dpo.lr", "1e-2", "--train.save_every", "1"]
    for out, env in (("full", {}), ("cut", {"RTO_FAULT": "kill_after_step:2"})):
        done = rto_subprocess(*args(out, *learn), env=env)
        assert done.returncode == (0 if out == "full" else -9), done.stderr
    saved = load_file(str(tmp_path / "cut" / "checkpoints" / "step-2" / "model.safetensors"))
    assert saved and not any(".dpo." in k for k in saved)  # the source checkpoints it, apart
    resumed = rto_subprocess(*args("cut", *learn, "--resume"))
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    for folder in (Path("."), Path("token_reward_model")):
        a, b = adapters_of(tmp_path / "full" / folder), adapters_of(tmp_path / "cut" / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    learned = adapters_of(tmp_path / "full" / "token_reward_model")
    assert any(not torch.equal(learned[k], given[k]) for k in given)
    card = json.loads((tmp_path / "full" / "token_reward_model" / "lora_base.json").read_text())
    assert Path(card["base_model"]) == sft_model.resolve()  # an adapter on the shared base
    frozen_policy = adapters_of(tmp_path / "frozen")
    assert any(
        not torch.equal(frozen_policy[k], adapters_of(tmp_path / "full")[k]) for k in frozen_policy
    )


def test_an_adapter_on_another_base_is_refused_with_both_fingerprints(
    tiny_task: Path, sft_model: Path, on_sft: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    elsewhere = make_adapter(
        tiny_task / "base_model", tmp_path / "dpo_on_base", score_head=False, seed=5
    )
    code = rto(*rl_args(tiny_task, sft_model, on_sft["rm"], elsewhere, tmp_path / "rl", *SHARED_RUN,
                        "--preset", "rto"))  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    recorded = json.loads((elsewhere / "lora_base.json").read_text())["fingerprint"]
    found = lora.fingerprint(load_causal_lm(ModelSection(path=str(sft_model)), trainable=False))
    assert (
        f"the DPO model {elsewhere} is a LoRA adapter on a base with weights fingerprint {recorded}"
        in err
    )
    assert f"the policy's base {sft_model} has fingerprint {found}" in err
    assert not (tmp_path / "rl").exists()  # refused before the run folder was made


def test_gradient_checkpointing_recomputes_each_role_with_its_own_adapter(
    tiny_task: Path, tmp_path: Path
) -> None:
    """Backward recomputes a checkpointed layer when the policy's adapter is active again; the
    critic's layers must be recomputed with the critic's adapter: the same gradients as without
    checkpointing."""
    base = tiny_task / "base_model"
    rm = make_adapter(base, tmp_path / "rm", score_head=True, seed=6)
    b = batch(300)
    grads = []
    for checkpointing in (False, True):
        cfg = RLConfig(model=ModelSection(path=str(base), gradient_checkpointing=checkpointing),
                       reward_model=str(rm), lora=LoraSection(r=4))  # fmt: skip
        torch.manual_seed(0)  # the new policy adapter's A is drawn at random
        roles = load_shared_base(cfg, load_tokenizer(cfg.model), use_dpo=False, use_rm=True,
                                 critic_from=str(rm), device=torch.device("cpu"))  # fmt: skip
        with torch.no_grad():
            for p in roles.adapters.parameters("policy"):
                p.add_(0.05)  # a trained policy adapter: it differs from the critic's
        assert roles.adapters.hf.is_gradient_checkpointing == checkpointing
        (roles.logprobs("policy", b).sum() + roles.values(b).sum()).backward()
        policy, critic = roles.trained_parameters()
        grads.append([p.grad.clone() for p in policy + critic])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_two_processes_run_a_shared_base_job_with_identical_weights(
    tiny_task: Path, sft_model: Path, on_sft: dict, tmp_path: Path
) -> None:
    """DDP over the actor-critic of the shared base (the base registered once, the policy's and
    the critic's adapters and the value head synchronised): both processes end identical."""
    from test_distributed import torchrun

    out = tmp_path / "rl"
    args = rl_args(tiny_task, sft_model, on_sft["rm"], on_sft["dpo"], out, *SHARED_RUN)
    done = torchrun(*args, "--preset", "rto", "--train.micro_batch_size", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("[rto] roles: one shared base") == 1  # said once, by the main process
    summary = json.loads((out / "summary.json").read_text())
    assert summary["roles"] == "one shared base"
    assert summary["weights_identical_across_processes"] is True
    assert adapters_of(out) and adapters_of(out / "critic")
