"""One job on many processes: the process group, and the few collective steps every stage uses.

`torchrun --nproc_per_node N -m rto ...` and `accelerate launch -m rto ...` start N copies of
the same command; `init_distributed` joins them into one job before anything else asks
accelerate (accelerate picks its state once, at the first `PartialState()`). On GPUs the
backend is nccl; on CPUs accelerate forms a process group only when told the job runs on CPU,
so it is told, with gloo. A job started with several processes that still ends up with one
process group per process (N independent runs writing into one folder) is refused.

Work is split by contiguous shares (`share`), results are gathered back in their global order
(`gather_ordered`), and logged numbers are sums over all processes divided by global counts
(`sum_over_processes`), so what a run writes does not depend on how many processes made it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import torch

from rto.errors import RtoError
from rto.models.forward import Runner
from rto.models.placement import shards_weights

_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch, mpirun) started."""
    for name in _WORLD_VARS:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


def init_distributed() -> Any:
    """accelerate's PartialState for this job: one process group over every launched process."""
    from accelerate import PartialState

    state = PartialState._shared_state
    if not state:
        launched = launched_processes()
        on_cpu = not torch.cuda.is_available() or os.environ.get(
            "ACCELERATE_USE_CPU", ""
        ).lower() in ("1", "true", "yes")
        if launched > 1 and on_cpu:
            # accelerate forms a CPU process group only when asked; gloo works everywhere
            # (accelerate would pick MPI where torch has it, which torchrun does not set up)
            PartialState(cpu=True, backend="gloo")
        else:
            PartialState()
    state = PartialState()
    if (
        os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
        and not torch.cuda.is_available()
    ):
        raise RtoError(
            "the accelerate config asks for FSDP, which accelerate runs on GPUs only, and this "
            "machine has none (accelerate would silently run DDP instead). On CPUs use "
            "configs/accelerate/ddp.yaml, or DeepSpeed ZeRO (configs/accelerate/deepspeed_zero2.yaml, "
            "deepspeed_zero3.yaml) to shard the trained models"
        )
    launched = launched_processes()
    if launched > 1 and state.num_processes != launched:
        raise RtoError(
            f"this command was started as {launched} processes (WORLD_SIZE={launched}), but they did not form one "
            f"distributed job (accelerate sees {state.num_processes} process, {state.distributed_type}); each "
            "would train alone and write into the same folder. Start it with `torchrun --nproc_per_node N -m rto ...` "
            "or `accelerate launch [--config_file configs/accelerate/...] -m rto ...` on a machine where the "
            "processes can reach each other (MASTER_ADDR, MASTER_PORT)"
        )
    return state


def on_main_process(fn: Any, *args: Any) -> Any:
    """Run fn on the main process only while the others wait (stages that only write files)."""
    state = init_distributed()
    result = fn(*args) if state.is_main_process else None
    state.wait_for_everyone()
    return result


def describe() -> dict[str, Any]:
    """World size and distributed type, for summary.json."""
    state = init_distributed()
    return {
        "world_size": state.num_processes,
        "distributed_type": str(state.distributed_type).split(".")[-1],
    }


def rank_and_world() -> tuple[int, int]:
    state = init_distributed()
    return state.process_index, state.num_processes


def share(n: int, rank: int, world: int) -> range:
    """This process's contiguous share of n items (the first n % world processes get one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def gather_ordered(items: list[Any], order: list[int]) -> list[Any]:
    """Every process's `items`, on every process, sorted by their global index in `order`."""
    from accelerate.utils import gather_object

    _, world = rank_and_world()
    if world == 1:
        return [x for _, x in sorted(zip(order, items), key=lambda p: p[0])]
    pairs = gather_object(list(zip(order, items)))
    return [x for _, x in sorted(pairs, key=lambda p: p[0])]


def sum_over_processes(values: dict[str, float]) -> dict[str, float]:
    """The sum over all processes of each value (the keys must be the same on every process)."""
    _, world = rank_and_world()
    if world == 1 or not values:
        return dict(values)
    import torch.distributed as dist
    from accelerate import PartialState

    keys = sorted(values)  # the same order on every process
    device = PartialState().device
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    summed = dict(zip(keys, t.tolist()))
    return {k: summed[k] for k in values}


def max_over_processes(value: float) -> float:
    _, world = rank_and_world()
    if world == 1:
        return value
    import torch.distributed as dist
    from accelerate import PartialState

    t = torch.tensor([float(value)], dtype=torch.float64, device=PartialState().device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# --------------------------------------------------------------------------- whole weights


def load_models_whole(accelerator: Any) -> None:
    """From now on transformers loads every model whole, even under ZeRO-3.

    accelerate registers a ZeRO-3 config with transformers, which then partitions every model it
    loads (deepspeed.zero.Init) whatever zero3_init_flag says; but only models that go through
    `accelerator.prepare` get the hooks that gather them again. The frozen roles (reference, DPO
    model, reward model; the models of `rto pairs` and `rto eval` in a pipeline) only run forward
    passes and are never prepared, and a new reward head is initialised in place. So rto loads
    every model whole and lets DeepSpeed shard the prepared ones when they are prepared."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


class GenerationWeights:
    """The trained policy as `generate` needs it: whole weights on this process's device.

    Under DDP and ZeRO-1/2 every process holds the whole model, which generates as it is. Under
    ZeRO-3 and FSDP each process holds a shard, and generating through the sharded model would
    gather every layer's weights again for every new token. Instead the weights are gathered once
    per rollout into a plain copy of the model kept on each device (memory: one more copy of the
    policy per device), which then generates with no communication at all."""

    def __init__(self, accelerator: Any, model: Any, part: str | None = None):
        """`model` as prepared by accelerate; `part`: the attribute of the unwrapped model that
        generates (the policy inside the RL stage's actor-critic wrapper)."""
        self.accelerator = accelerator
        self.model = model
        if part is None and isinstance(accelerator.unwrap_model(model), Runner):
            part = "model"  # a model trained through ops: the causal LM is its submodule
        self.part = part
        self.sharded = shards_weights(accelerator)
        self._copy: Any = None

    def _generator(self) -> Any:
        unwrapped = self.accelerator.unwrap_model(self.model)
        return getattr(unwrapped, self.part) if self.part else unwrapped

    @contextmanager
    def __call__(self) -> Any:
        if not self.sharded:
            yield self._generator()
            return
        full = self._full_state_dict()
        if self.part:
            prefix = self.part + "."
            full = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
        if self._copy is None:
            self._copy = _plain_copy(self._generator(), self.accelerator.device)
        missing, _ = self._copy.load_state_dict(full, strict=False)
        tied = set(getattr(self._copy, "_tied_weights_keys", None) or [])
        if set(missing) - tied:
            raise RuntimeError(f"gathered weights lack {sorted(set(missing) - tied)[:5]}")
        del full
        yield self._copy

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            import deepspeed

            generator = self._generator()
            params = list(generator.parameters())
            with deepspeed.zero.GatheredParameters(params):  # one all-gather of the whole model
                state = {k: v.detach().clone() for k, v in generator.state_dict().items()}
            return {f"{self.part}.{k}": v for k, v in state.items()} if self.part else state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))


def _plain_copy(model: Any, device: Any) -> Any:
    """A new, unsharded model of the same class and config, frozen, on `device`."""
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), None)
    with torch.device(device):  # initialised where it will live: fast, and no host copy
        copy = type(model)(model.config)
    if dtype is not None:
        copy = copy.to(dtype)
    copy.generation_config = model.generation_config
    return copy.to(device).eval().requires_grad_(False)
