"""Where a prepared model's weights live: whole on every process (one process, DDP, ZeRO-1/2) or
sharded over the processes (DeepSpeed ZeRO-3, FSDP), as accelerate prepared it."""

from __future__ import annotations

from typing import Any


def shards_weights(accelerator: Any) -> bool:
    """True under DeepSpeed ZeRO-3 and FSDP, where no process holds a model's whole weights."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3
    return False
