"""`rto rl` end to end with groups of responses on the tiny task: the group presets run without a
critic, beta1 = 0 under rto_grpo is plain GRPO, and the online token-reward model: with a
learning rate of 0 it is the frozen run bit for bit, the DPO model's weights move only when
online, and a stopped online run resumes to the uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_rl_stage import same_weights

from conftest import rl_args, rto, rto_ok

# 8 prompts x K = 2 responses per iteration: cheap, and groups on every path
SMALL = ["--rl.rollout_batch_size", "8", "--rl.samples_per_prompt", "2", "--train.batch_size", "16"]


@pytest.fixture(scope="module")
def run(tiny_task: Path, sft_model: Path, reward_model: Path, dpo_model: Path):
    def go(out: Path, *extra: str, code: int = 0) -> list[dict]:
        args = rl_args(tiny_task, sft_model, reward_model, dpo_model, out, *SMALL, *extra)
        if code == 0:
            rto_ok(*args)
            return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert rto(*args) == code
        return []

    return go


def test_the_group_presets_run_without_a_critic(run, tmp_path: Path) -> None:
    for preset in ("grpo", "rto_grpo", "rloo", "rto_rloo"):
        row = run(tmp_path / preset, "--preset", preset, "--train.max_steps", "2")[-1]
        s = json.loads((tmp_path / preset / "summary.json").read_text())
        assert s["iterations"] == 2 and s["skipped_steps"] == 0 and s["samples"] == 32, preset
        assert "value/loss" not in row  # critic-free: no critic loaded, none trained
        assert ("rollout/dpo_reward_sum" in row) == preset.startswith("rto_")
        in_loss = preset.endswith("grpo")  # GRPO: the KL is a k3 loss term, not in the reward
        assert ("policy/kl_loss" in row) == in_loss and ("reward/kl_sum" in row) != in_loss
    assert not same_weights(tmp_path / "grpo", tmp_path / "rto_grpo")  # the DPO reward counts


def test_rto_grpo_with_beta1_zero_is_plain_grpo(run, tmp_path: Path) -> None:
    a = run(tmp_path / "grpo", "--preset", "grpo", "--train.max_steps", "2")
    b = run(
        tmp_path / "rto0",
        "--preset",
        "rto_grpo",
        "--rl.dpo_reward.scale",
        "0",
        "--train.max_steps",
        "2",
    )
    assert same_weights(tmp_path / "grpo", tmp_path / "rto0")
    assert [r.get("policy/loss") for r in a] == [r.get("policy/loss") for r in b]


def comparable(rows: list[dict]) -> list[dict]:
    """metrics.jsonl without wall-clock times and the online source's own logs."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "source/"))} for r in rows]


def test_online_with_lr_zero_is_frozen_and_only_online_moves_the_dpo_model(
    run, dpo_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rto.rl import sources

    seen: list[float] = []  # a checksum of the DPO model's weights each time it scores

    original = sources.DPOSource.__call__

    def watched(self, r):
        seen.append(sum(float(p.detach().double().sum()) for p in self.ctx.roles.dpo.parameters()))
        return original(self, r)

    monkeypatch.setattr(sources.DPOSource, "__call__", watched)
    common = ["--preset", "rto_rloo", "--train.max_steps", "3"]
    frozen = run(tmp_path / "frozen", *common)
    assert len(set(seen)) == 1
    seen.clear()
    for order in ("after", "before"):
        zero = run(tmp_path / f"zero_{order}", *common, "--rl.online_dpo.enabled", "true",
                   "--rl.online_dpo.lr", "0", "--rl.online_dpo.order", order)  # fmt: skip
        assert comparable(zero) == comparable(frozen), order
        assert same_weights(tmp_path / "frozen", tmp_path / f"zero_{order}")
        assert len(set(seen)) == 1
        steps = [r for r in zero if "source/dpo/loss" in r]
        assert len(steps) == 3 and all(r["source/dpo/reward_drift"] == 0.0 for r in steps)
        seen.clear()
    online = run(tmp_path / "online", *common, "--rl.online_dpo.enabled", "true",
                 "--rl.online_dpo.lr", "1e-3", "--rl.online_dpo.steps", "2")  # fmt: skip
    assert len(set(seen)) == 4  # the DPO model as loaded, then a new one after each rollout
    steps = [r for r in online if "source/dpo/loss" in r]
    assert all(
        r["source/dpo/reward_drift"] > 0 and 0 <= r["source/dpo/accuracy"] <= 1 for r in steps
    )
    assert [r["source/dpo/updates"] for r in steps] == [2.0, 4.0, 6.0]
    assert not same_weights(tmp_path / "frozen", tmp_path / "online")
    # the DPO model as it learned is saved beside the policy; a frozen run has none to save
    assert not (tmp_path / "frozen" / "token_reward_model").exists()
    assert same_weights(tmp_path / "zero_after" / "token_reward_model", dpo_model)
    assert not same_weights(tmp_path / "online" / "token_reward_model", dpo_model)
    summary = json.loads((tmp_path / "online" / "summary.json").read_text())
    assert summary["token_reward_model"] == str(tmp_path / "online" / "token_reward_model")


def test_a_nan_in_the_online_loss_skips_that_update_and_leaves_the_dpo_model_as_it_was(
    run, dpo_model: Path, sft_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    """A NaN injected into the online model's loss in `rto rl`: its update is skipped and said,
    the DPO model saved after the run is the one given, bit for bit; the policy trains on."""
    from rto.rl import online_reward

    real = online_reward.prime_loss

    def poisoned(z, y, w, n):  # noqa: ANN001, ANN202
        loss, correct = real(z, y, w, n)
        return loss * float("nan"), correct

    monkeypatch.setattr(online_reward, "prime_loss", poisoned)
    rows = run(tmp_path / "nan", "--preset", "rto_rloo", "--train.max_steps", "2",
               "--rl.online_dpo.enabled", "true", "--rl.online_dpo.lr", "1e-3")  # fmt: skip
    err = capsys.readouterr().err
    assert "non-finite loss or gradient in the online token-reward model; update skipped" in err
    assert [r["source/dpo/skipped_steps"] for r in rows if "source/dpo/loss" in r] == [1.0, 2.0]
    assert same_weights(tmp_path / "nan" / "token_reward_model", dpo_model)
    assert not same_weights(tmp_path / "nan", sft_model)  # the policy's own updates were taken
    assert json.loads((tmp_path / "nan" / "summary.json").read_text())["skipped_steps"] == 0


def test_a_stopped_online_run_resumes_to_the_uninterrupted_one(
    run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = ["--preset", "rto_rloo", "--train.max_steps", "3", "--train.save_every", "1",
             "--rl.online_dpo.enabled", "true", "--rl.online_dpo.lr", "1e-3"]  # fmt: skip
    whole = run(tmp_path / "whole", *extra)
    monkeypatch.setenv("RTO_FAULT", "disk_full_during_save:2")
    run(tmp_path / "stopped", *extra, code=2)
    monkeypatch.delenv("RTO_FAULT")
    resumed = run(tmp_path / "stopped", *extra, "--resume")
    assert same_weights(tmp_path / "whole", tmp_path / "stopped")
    last = {k: v for k, v in resumed[-1].items() if not k.startswith("time/")}
    assert last == {k: v for k, v in whole[-1].items() if not k.startswith("time/")}


def test_online_is_refused_without_a_dpo_reward(run, tmp_path: Path, capsys) -> None:
    run(tmp_path / "o", "--preset", "grpo", "--rl.online_dpo.enabled", "true", code=2)
    assert "config key 'rl.online_dpo.enabled'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything was written
