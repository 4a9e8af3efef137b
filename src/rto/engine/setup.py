"""Set-up: the accelerate `Accelerator` a training stage runs on, and its batch arithmetic.

One optimiser step is one global batch, whatever the micro-batch size and the process count:
each of the N processes takes train.batch_size / N samples a step, in micro-batches of at most
train.micro_batch_size; the rest is gradient accumulation. One CPU, one GPU, DDP, DeepSpeed or
FSDP is accelerate's choice (`accelerate launch` and its config); rto only tells DeepSpeed the
batch sizes, since rto feeds the batches itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rto.engine.distributed import load_models_whole
from rto.engine.trainable_state import checkpoint_trainable_only
from rto.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """How one optimiser step's global batch is split: over `world` processes, each taking
    `share` samples in `accumulation` micro-batches of `micro_batch_size`."""

    world: int
    share: int
    micro_batch_size: int
    accumulation: int

    @property
    def micro_loss_factor(self) -> int:
        """accelerate divides each micro-batch loss by the accumulation steps, and DDP / DeepSpeed
        / FSDP average gradients over processes. A micro-batch loss that is already its share of
        the step's global mean (summed over its items, divided by the items of the whole step on
        all processes) is multiplied by this, so that the gradient is that of the global mean,
        however many micro-batches the step has."""
        return self.accumulation * self.world


def batch_plan(train: Any, world: int) -> BatchPlan:
    """The split of train.batch_size over `world` processes, or a ConfigError naming the key."""
    if train.batch_size % world:
        raise ConfigError(
            f"config key 'train.batch_size' ({train.batch_size}) must be a multiple of the number of "
            f"processes ({world}): each process takes an equal share of every batch"
        )
    share = train.batch_size // world
    # a recipe written for one process runs unchanged on several: a micro-batch larger than a
    # process's share shrinks to it (the update does not depend on the micro-batch size)
    micro = min(train.micro_batch_size, share)
    if share % micro:
        raise ConfigError(
            f"config key 'train.batch_size' ({train.batch_size}) must be a multiple of "
            f"train.micro_batch_size ({micro}) x processes ({world}) = {micro * world}"
        )
    return BatchPlan(world, share, micro, share // micro)


def mixed_precision_mode(name: str) -> str:
    """train.mixed_precision as accelerate takes it: auto = bf16 on GPUs that have it, else no."""
    if name != "auto":
        return name
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(train: Any, plan: BatchPlan, seed: int) -> Any:
    """The Accelerator of one stage run, seeded, with rto's checkpoint hooks (a LoRA checkpoint
    leaves out the frozen base) and DeepSpeed told the batch sizes rto feeds it."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        mixed_precision=mixed_precision_mode(train.mixed_precision),
        gradient_accumulation_steps=plan.accumulation,
        step_scheduler_with_optimizer=False,
    )
    checkpoint_trainable_only(accelerator)
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None:  # rto feeds batches itself: DeepSpeed learns their size here
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
        deepspeed.deepspeed_config["gradient_accumulation_steps"] = plan.accumulation
        deepspeed.deepspeed_config["train_batch_size"] = train.batch_size
        load_models_whole(accelerator)
    set_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    return accelerator
