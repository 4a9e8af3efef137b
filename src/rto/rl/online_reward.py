"""An online token-reward model: the DPO model keeps learning on the policy's own samples, by
PRIME's implicit-PRM update (Cui et al. 2025, arXiv 2502.01456, eq. 3; rl.online_dpo).

Response y_i's token rewards are beta1 * x_{i,t}, x_{i,t} = log pi_phi(y_t|x,y_<t) - log
pi_ref(y_t|x,y_<t) (pi_phi the DPO model); its implicit outcome reward is their sum z_i, and

    L(phi) = -1/N sum_i w_i [ y_i log sigmoid(z_i) + (1 - y_i) log(1 - sigmoid(z_i)) ],
    z_i = beta1 * sum_t x_{i,t},    N = sum_i w_i over the whole rollout (every process).

beta is beta1 = rl.dpo_reward.scale, not the beta the DPO model was trained with: the loss then
trains exactly the reward the policy is given (its clip, rl.dpo_reward.clip, is left out of z).

The label y_i comes from the sentence reward s_i = beta3 * score_i + w_fn * reward_fn_i (the
reward model's raw score, rl.reward_fn.coef times the reward function), rl.online_dpo.label:

    group_mean  y_i = 1 if s_i is above the mean of its group (the prompt's K responses), else 0;
                w_i = 0 for a group whose rewards are all equal. A reward model's score is
                unbounded and only its differences between responses to one prompt mean
                something (Bradley-Terry), so the label compares within the group, as PRIME's
                correct / incorrect does; PRIME likewise drops prompts all right or all wrong.
                The raw score is read: normalising it by one mean and std for the whole rollout
                would not change any group's order.
    value       y_i = s_i, which must lie in [0, 1] (a verifiable reward: PRIME's outcome label).

Each of rl.online_dpo.steps optimiser steps is on the whole rollout, in chunks of
rl.forward_batch_size responses: gradients accumulated over the chunks and averaged over the
processes, the loss divided by the global N. The DPO model is a second optimised module of the
engine (engine/optimise.py), beside the policy's: its own AdamW (learning rate
rl.online_dpo.lr, no weight decay), the schedule over the run's online steps, gradient clipping
at train.grad_clip, and its own step health: a non-finite loss or gradient skips that step and
leaves the DPO model as it was. Prepared by accelerate, it is sharded under ZeRO-3 / FSDP like
the policy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rto.engine.distributed import sum_over_processes
from rto.errors import RtoError


def sentence_labels(
    s: torch.Tensor, group: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, w), each (B,), from the sentence rewards `s` (B,) and group ids (B,) (above)."""
    s = s.double()
    if kind == "value":
        if ((s < 0) | (s > 1) | ~torch.isfinite(s)).any():
            raise RtoError(
                f"rl.online_dpo.label value needs sentence rewards in [0, 1], got {float(s.min()):.4g} .. "
                f"{float(s.max()):.4g}; use rl.online_dpo.label group_mean for a reward model's score"
            )
        return s, torch.ones_like(s)
    if kind != "group_mean":
        raise ValueError(f"unknown rl.online_dpo.label {kind!r}")
    y, w = torch.zeros_like(s), torch.zeros_like(s)
    for g in torch.unique(group):
        rows = group == g
        members = s[rows]
        y[rows] = (members > members.mean()).double()
        w[rows] = float(bool((members != members[0]).any()))
    return y, w


def prime_loss(
    z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, n: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i w_i CE(sigmoid(z_i), y_i) / n, sum_i w_i [the prediction z_i > 0 agrees with y_i])."""
    ce = F.binary_cross_entropy_with_logits(z, y.to(z.dtype), reduction="none")
    correct = ((z > 0) == (y > 0.5)).to(w.dtype)
    return (w.to(z.dtype) * ce).sum() / max(n, 1e-12), (w * correct.detach()).sum()


class OnlineTokenReward:
    """The learning half of an online DPO source: labels, loss, and the DPO model as an optimised
    module. `roles.prepare_dpo(engine, lr)` gives it (`Roles.prepare_dpo`: a separate model trains
    whole; the shared base's DPO adapter only inside each step); `prepare` is called once the
    run's length is known, before --resume loads the checkpoint."""

    def __init__(self, roles: Any, *, beta: float, lr: float, steps: int, label: str,
                 batch_size: int, sentence_weights: dict[str, float]):  # fmt: skip
        self.roles = roles
        self.beta, self.lr, self.steps, self.label = beta, lr, steps, label
        self.batch_size = batch_size
        # "score" (beta3, 0 without a reward model) and each sentence reward function's weight
        self.sentence_weights = sentence_weights
        self.engine: Any = None
        self.trained: Any = None  # engine.optimise.Optimised, once prepared
        self.total = 1  # optimiser steps in the whole run: the schedule's length
        self.updates = 0

    def prepare(self, engine: Any, iterations: int) -> None:
        """The DPO model on the engine's optimisation path, for `iterations` rollouts."""
        self.engine = engine
        self.trained = self.roles.prepare_dpo(engine, self.lr)
        self.total = max(1, iterations * self.steps)

    @property
    def module(self) -> Any:
        """The DPO model as accelerate prepared it (None: an adapter inside the policy's)."""
        return self.trained.module

    def sentence_reward(self, r: Any) -> torch.Tensor:
        s = self.sentence_weights.get("score", 0.0) * r.score.double()
        for name, values in r.sentence.items():
            s = s + self.sentence_weights.get(name, 0.0) * values.double()
        return s

    def step(self, r: Any, logp_ref: torch.Tensor) -> dict[str, float]:
        """rl.online_dpo.steps optimiser steps on rollout `r` (`logp_ref`: the reference's
        log-probs at temperature 1); returns the loss and accuracy before the first step."""
        y, w = sentence_labels(self.sentence_reward(r), r.group, self.label)
        totals = sum_over_processes({"n": float(w.sum()), "responses": float(len(r))})

        def loss_fn(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
            b = r.take(idx)
            x = self.roles.logprobs("dpo", b, 1.0) - logp_ref[idx]
            z = self.beta * (x * b["response_mask"]).sum(1)
            loss, right = prime_loss(z, y[idx], w[idx], totals["n"])
            return loss, {"loss": loss, "correct": right}

        first: dict[str, float] = {"loss": 0.0, "accuracy": 0.0, "labelled_share": 0.0}
        for k in range(self.steps if totals["n"] > 0 else 0):  # no label: nothing to learn
            result = self.trained.step(self.updates, self.total, list(r.chunks(self.batch_size)), loss_fn,
                                       scale=self.engine.micro_loss_factor, label=self.updates + 1)  # fmt: skip
            self.updates += 1
            if k == 0:
                sums = sum_over_processes(
                    {"loss": result.sums["loss"], "correct": result.sums["correct"]}
                )
                first = {"loss": sums["loss"], "accuracy": sums["correct"] / max(totals["n"], 1e-12),
                         "labelled_share": totals["n"] / totals["responses"], "lr": result.lr}  # fmt: skip
        return {**first, "updates": float(self.updates),
                "skipped_steps": float(self.trained.health.skipped)}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The update count; and for a DPO model accelerate did not prepare (the shared base's
        adapter) its learned parameters and optimiser, which no prepared module's checkpoint
        holds."""
        state: dict[str, Any] = {"updates": self.updates}
        if self.module is None:
            named = self.roles.dpo_parameters()
            state["model"] = {n: p.detach().clone() for n, p in named.items()}
            state["optimizer"] = self.trained.optimizer.state_dict()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        if self.module is not None:
            return
        named = self.roles.dpo_parameters()
        missing = sorted(set(named) - set(state.get("model", {})))
        if missing:
            raise RtoError(
                f"the checkpoint's online token-reward model lacks {len(missing)} of the DPO model's "
                f"parameters ({', '.join(missing[:3])}): it was saved by a run with another DPO model "
                "or layout; resume with the same dpo_model and lora settings"
            )
        for n, p in named.items():
            p.copy_(state["model"][n])
        self.trained.optimizer.load_state_dict(state["optimizer"])
