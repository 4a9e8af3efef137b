"""The online token-reward model (rl.online_dpo.enabled): PRIME's loss and its labels
against a hand computation, and its optimiser step, on the engine's path, on a model small
enough to follow by hand; a non-finite step is skipped."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rto.config.sections import LogSection, TrainSection
from rto.engine.trainer import Engine
from rto.errors import RtoError
from rto.rl.experience import Rollout
from rto.rl.online_reward import OnlineTokenReward, prime_loss, sentence_labels
from rto.rl.roles import ONLINE_MODULE


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


def test_labels_and_loss_against_a_hand_computation() -> None:
    group = torch.tensor([4, 4, 4, 8, 8, 9, 9])
    s = torch.tensor([1.0, 3.0, 2.0, 5.0, 5.0, -1.0, 0.5])
    y, w = sentence_labels(s, group, "group_mean")
    # group 4: mean 2 -> only 3.0 is above; group 8: all equal -> left out; group 9: mean -0.25
    assert y.tolist() == [0, 1, 0, 0, 0, 0, 1]
    assert w.tolist() == [1, 1, 1, 0, 0, 1, 1]
    z = torch.tensor([0.3, -0.2, 1.0, 0.0, 2.0, -0.5, 0.1], dtype=torch.float64)
    loss, correct = prime_loss(z, y, w, n=5.0)
    by_hand = 0.0
    for zi, yi, wi in zip(z.tolist(), y.tolist(), w.tolist()):
        by_hand -= wi * (yi * log_sigmoid(zi) + (1 - yi) * log_sigmoid(-zi))
    assert float(loss) == pytest.approx(by_hand / 5, rel=1e-12)
    assert float(correct) == 2.0  # responses 5 (z < 0, y = 0) and 6 (z > 0, y = 1)

    bounded = torch.tensor([0.0, 1.0, 0.25])
    y, w = sentence_labels(bounded, torch.tensor([0, 0, 1]), "value")
    assert y.tolist() == [0.0, 1.0, 0.25] and w.tolist() == [1, 1, 1]
    with pytest.raises(RtoError, match="rl.online_dpo.label"):
        sentence_labels(torch.tensor([0.5, 1.5]), torch.tensor([0, 0]), "value")


class TableRoles:
    """A 'DPO model' whose log-probs are a softmax over a table of V logits (one per token id),
    the same at every position; the reference is uniform. `poisoned` calls give NaN log-probs."""

    def __init__(self, vocab: int = 5, poisoned: int = 0) -> None:
        self.dpo = torch.nn.Linear(1, vocab, bias=False)
        torch.nn.init.zeros_(self.dpo.weight)
        self.model = self.dpo
        self.poisoned = poisoned

    def prepare_dpo(self, engine, lr: float):  # as rl.roles.Roles prepares a separate DPO model
        trained = engine.optimised(self.dpo, [(self.dpo, lr)], **ONLINE_MODULE)
        self.model = trained.module
        return trained

    def dpo_parameters(self) -> dict:
        return dict(self.dpo.named_parameters())

    def logprobs(self, role: str, batch: dict, temperature: float) -> torch.Tensor:
        assert role == "dpo" and temperature == 1.0
        logp = torch.log_softmax(self.model.weight[:, 0], 0)
        if self.poisoned:
            self.poisoned -= 1
            logp = logp * float("nan")
        return logp[batch["response_ids"]] * batch["response_mask"]


def make_engine(tmp_path: Path) -> Engine:
    """An engine of one process: a constant learning rate, so each step's rate is lr itself."""
    train = TrainSection(batch_size=4, micro_batch_size=4, schedule="constant", warmup_ratio=0.0)
    return Engine(train, LogSection(progress=False), tmp_path, seed=0, run_config={})


def learner(roles: TableRoles, lr: float, engine: Engine, **weights: float) -> OnlineTokenReward:
    online = OnlineTokenReward(roles, beta=0.5, lr=lr, steps=1, label="group_mean", batch_size=3,
                               sentence_weights=weights or {"score": 2.0, "reward_fn": 3.0})  # fmt: skip
    online.prepare(engine, iterations=4)
    return online


def rollout() -> Rollout:
    ids = torch.tensor([[1, 2, 0], [3, 3, 3], [1, 0, 0], [4, 4, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    r = Rollout(torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1), ids, mask, torch.zeros(4))
    r.group = torch.tensor([0, 0, 1, 1])
    r.score = torch.tensor([2.0, -1.0, 0.0, 0.5])
    r.sentence = {"reward_fn": torch.tensor([0.0, 0.0, 1.0, 0.0])}
    return r


@pytest.mark.parametrize("lr", [0.0, 0.1])
def test_one_online_step_by_hand(lr: float, tmp_path: Path) -> None:
    roles = TableRoles()
    online = learner(roles, lr, make_engine(tmp_path))
    r = rollout()
    logp_ref = torch.full((4, 3), math.log(1 / 5)) * r.response_mask
    metrics = online.step(r, logp_ref)
    # s = 2 * score + 3 * reward_fn = [4, -2, 3, 1]: labels [1, 0, 1, 0]; the table starts uniform,
    # so every z = 0 and the loss is log 2, each prediction (z > 0) false: accuracy 1/2
    assert metrics["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert metrics["accuracy"] == 0.5 and metrics["labelled_share"] == 1.0
    assert metrics["lr"] == lr and metrics["updates"] == 1.0 and metrics["skipped_steps"] == 0.0
    table = roles.dpo.weight[:, 0].detach()
    if lr == 0.0:
        assert (table == 0).all()  # computed, not applied: bit for bit unchanged
        return
    # AdamW's first step moves every weight with a gradient by lr against its sign: tokens of
    # responses labelled 1 (ids 1, 2) up, of responses labelled 0 (ids 3, 4) down
    assert table[1] > 0 and table[2] > 0 and table[3] < 0 and table[4] < 0
    assert table.abs().max() == pytest.approx(lr, rel=1e-3)
    state = online.state_dict()
    assert state == {"updates": 1}  # the prepared model and its optimiser are accelerate's to save
    fresh = TableRoles()
    other = learner(fresh, lr, make_engine(tmp_path / "other"), score=2.0)
    other.load_state_dict(state)
    assert other.updates == 1


def test_a_non_finite_online_step_is_skipped_and_leaves_the_dpo_model_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """NaN log-probs in the first step (one chunk of the rollout is enough): no update, the
    step counted and said; the next step learns as a first step would."""
    roles = TableRoles(poisoned=1)
    online = learner(roles, 0.1, make_engine(tmp_path))
    r = rollout()
    logp_ref = torch.full((4, 3), math.log(1 / 5)) * r.response_mask
    metrics = online.step(r, logp_ref)
    assert math.isnan(metrics["loss"]) and metrics["skipped_steps"] == 1.0
    assert (roles.dpo.weight == 0).all()  # unchanged, bit for bit
    assert "non-finite loss or gradient in the online token-reward model" in capsys.readouterr().err
    metrics = online.step(r, logp_ref)
    assert metrics["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert metrics["skipped_steps"] == 1.0 and metrics["updates"] == 2.0
    assert float(roles.dpo.weight.detach().abs().max()) == pytest.approx(0.1, rel=1e-3)
