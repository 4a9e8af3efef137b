"""Optimisation, written once: every trained module of every stage takes its steps here.

An `Optimised` is one trained module with its own AdamW optimiser (a parameter group per part,
each with its peak learning rate), the schedule, gradient clipping and its step health. Its one
method, `step`, takes one optimiser step on one global batch, given as this process's
micro-batches and a function that returns each micro-batch's loss:

    learning rates     each group's from its peak by the schedule (engine/schedule.py)
    each micro-batch   loss x `scale` backpropagated (the caller's loss is its share of the step's
                       global mean; `scale` undoes accelerate's division by the accumulation steps
                       and the average over processes); a non-finite loss is zeroed and marks the
                       step; gradients are synchronised at the last micro-batch only
    the last one       gradient norms clipped to train.grad_clip; the step taken unless any
                       process saw a non-finite loss or norm; gradients cleared; the step counted
                       (engine/resume.StepHealth)

Three kinds of module take this path: the supervised stages' model (`Engine.fit`), the RL
stage's actor-critic (rl/trainer.py), and the online token-reward model (rl/online_reward.py).
Each is prepared by accelerate, so DDP averages its gradients and DeepSpeed / FSDP shard it
(a second module under DeepSpeed is a second DeepSpeed engine, which accumulates, clips and steps
itself). The one exception is an adapter inside another prepared module (the shared base's DPO adapter):
it cannot be wrapped twice, so its gradients are averaged over processes here. This file holds
rto's only call of an optimiser's step.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rto.engine.resume import StepHealth

# (loss of one micro-batch, metrics of it summed over its items)
LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, Any]]]


def adamw(
    train: Any, groups: Sequence[tuple[Any, float]], weight_decay: float | None = None
) -> Any:
    """AdamW with one parameter group per (module or list of parameters, peak learning rate),
    with train's betas, epsilon and weight decay (or `weight_decay`). A module's group holds
    the parameters that require gradients; a list is taken as it is (an adapter that trains
    only inside its own steps is frozen when the optimiser is made)."""
    param_groups = [
        {"params": [p for p in part.parameters() if p.requires_grad]
         if isinstance(part, torch.nn.Module) else list(part), "lr": lr}
        for part, lr in groups
    ]  # fmt: skip
    return torch.optim.AdamW(
        param_groups,
        lr=groups[0][1],
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
        weight_decay=train.weight_decay if weight_decay is None else weight_decay,
    )


def parameters(part: Any) -> Any:
    """A module's parameters, or a list of parameters as it is."""
    return part.parameters() if isinstance(part, torch.nn.Module) else part


@dataclass
class StepResult:
    """What one step did: the first group's learning rate, whether it was taken, the first
    group's gradient norm before clipping (None when not known), and the metrics the loss
    function returned, summed over this process's micro-batches."""

    lr: float
    finite: bool
    grad_norm: float | None
    sums: dict[str, float] = field(default_factory=dict)


class Optimised:
    """A trained module, its optimiser and its step health (see the module's docstring).

    module:   what accelerate prepared (the module to run the forward through), or None for
              parameters inside another prepared module (their gradients are averaged here)
    groups:   (module or parameters, peak learning rate) per optimiser group, in order
    health:   the module's StepHealth
    context:  a context every step runs in (the shared base's DPO adapter trains only inside it)"""

    def __init__(self, engine: Any, module: Any, optimizer: Any, groups: Sequence[tuple[Any, float]],
                 health: StepHealth, context: Callable[[], Any] = contextlib.nullcontext):  # fmt: skip
        self.engine, self.module, self.optimizer = engine, module, optimizer
        self.parts = [part for part, _ in groups]
        self.peaks = [peak for _, peak in groups]
        self.health, self.context = health, context
        # a DeepSpeed engine accumulates, clips and steps itself (one engine per module)
        self._deepspeed = module if type(module).__name__ == "DeepSpeedEngine" else None

    @property
    def accelerator(self) -> Any:
        return self.engine.accelerator

    def step(self, index: int, total: int, batches: Sequence[Any], loss_fn: LossFn, *,
             scale: float, label: int, sums: dict[str, float] | None = None) -> StepResult:  # fmt: skip
        """Optimiser step `index` of `total` (the schedule's position) on `batches`, this
        process's micro-batches of one global batch; `label` numbers the step in messages. The
        loss function's metrics are summed into `sums` when given (a loop that sums over several
        steps adds each micro-batch in turn), else into the result's own."""
        acc = self.accelerator
        rates = [self.engine.lr_at(index, total, peak) for peak in self.peaks]
        for group, lr in zip(self.optimizer.param_groups, rates):
            group["lr"] = lr
        finite, grad_norm = True, None
        sums = defaultdict(float) if sums is None else sums
        with self.context(), torch.enable_grad():
            for i, batch in enumerate(batches):
                sync = i == len(batches) - 1
                with self._synchronising(sync):
                    with acc.autocast():
                        loss, stats = loss_fn(batch)
                    if not torch.isfinite(loss.detach()).all():
                        finite = False
                        loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
                    self._backward(loss * scale, sync)
                for k, v in stats.items():
                    sums[k] += float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            if self.module is None:
                self._average_gradients()
            norms = self._clip()
            finite = not self.engine.any_true(not finite) and all(
                n is None or math.isfinite(n) for n in norms
            )
            if finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            grad_norm = norms[0]
        self.health.record(finite, label)
        return StepResult(rates[0], finite, grad_norm, dict(sums))

    # ------------------------------------------------------------------ the parts of a step

    def _synchronising(self, sync: bool) -> Any:
        """Gradients are reduced over processes at the last micro-batch of a step only."""
        if sync or self.module is None:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.module)

    def _backward(self, loss: torch.Tensor, sync: bool) -> None:
        if self._deepspeed is not None:  # its engine accumulates, and steps at the boundary
            self._deepspeed.set_gradient_accumulation_boundary(is_boundary=sync)
            self._deepspeed.backward(loss)
            if sync:
                self._deepspeed.step()
        elif self.module is not None:  # divides by the accumulation steps (fp16: scaled)
            self.accelerator.backward(loss)
        else:
            (loss / self.accelerator.gradient_accumulation_steps).backward()

    def _average_gradients(self) -> None:
        """Parameters no wrapper reduces: their gradients averaged over processes, as DDP does."""
        world = self.accelerator.num_processes
        if world == 1:
            return
        import torch.distributed as dist

        for part in self.parts:
            for p in parameters(part):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(world)

    def _clip(self) -> list[float | None]:
        """Each group's gradient norm before clipping to train.grad_clip. DeepSpeed clips inside
        its own step (gradient_clipping in its config, over all parameters) and reports the norm
        (None until its first step); under FSDP the norm of sharded gradients is the prepared
        module's business, so the groups are clipped together."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if self._deepspeed is not None:
            norm = self._deepspeed.get_global_grad_norm()
            return [None if norm is None else float(norm)] * len(self.parts)
        max_norm = self.engine.train.grad_clip if self.engine.train.grad_clip > 0 else float("inf")
        parts = self.parts
        if self.module is not None and acc.distributed_type == DistributedType.FSDP:
            parts = [self.module]
        norms = [acc.clip_grad_norm_(list(parameters(p)), max_norm) for p in parts]
        return [None if n is None else float(n) for n in norms]
