"""One optimiser step, written once: the supervised loop (`Engine.fit`: sft, rm, dpo) and each
minibatch of the RL update (`rl/trainer.PPOTrainer.update`) both take their steps through it."""

from __future__ import annotations

import math
from typing import Any

import torch


class OptimizerStep:
    """One optimiser step, as every training loop takes it (the supervised loop of sft, rm and
    dpo, and each minibatch of the RL update):

        start(index, total)   each parameter group's learning rate from its peak, by the schedule
        backward(loss)        per micro-batch, inside accelerator.accumulate: the loss (already
                              its share of the step's mean) backpropagated; a non-finite loss is
                              zeroed and marks the step; at the synchronising micro-batch the
                              gradient norms are clipped, the step is taken unless any process
                              saw a non-finite loss or norm, and the gradients are cleared
        finish(label)         the step counted as taken or skipped (`Engine.record_step_health`)

    `groups` are (model or parameters, peak learning rate) in the optimiser's group order;
    `whole` is the prepared module when the groups are parts of it (FSDP clips it whole)."""

    def __init__(self, engine: Any, optimizer: Any, groups: list[tuple[Any, float]],
                 whole: Any = None):  # fmt: skip
        self.engine, self.optimizer, self.whole = engine, optimizer, whole
        self.parts = [part for part, _ in groups]
        self.peaks = [peak for _, peak in groups]
        self.finite = True
        self.grad_norm: float | None = None  # the first group's norm before clipping, if synced

    def start(self, index: int, total: int) -> float:
        """Set the learning rates for step `index` of `total`; return the first group's."""
        rates = [self.engine.lr_at(index, total, peak) for peak in self.peaks]
        for group, lr in zip(self.optimizer.param_groups, rates):
            group["lr"] = lr
        self.finite, self.grad_norm = True, None
        return rates[0]

    def backward(self, loss: torch.Tensor) -> None:
        eng = self.engine
        if not torch.isfinite(loss.detach()).all():
            self.finite = False
            loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
        eng.accelerator.backward(loss)
        if not eng.accelerator.sync_gradients:
            return
        norms = eng.clip_gradients(self.parts, whole=self.whole)
        self.finite = not eng.any_true(not self.finite) and all(
            n is None or math.isfinite(n) for n in norms
        )
        if self.finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_norm = norms[0]

    def finish(self, label: int) -> bool:
        """Count the step (`label`: the step number the logs show); True when it was taken."""
        self.engine.record_step_health(self.finite, label)
        return self.finite
