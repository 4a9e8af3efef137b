"""Where an RL update's memory goes: one `rto rl` run of benchmarks/memory.py (default: the
shared-base LoRA RTO configuration), with the peak RSS of each phase (rollout, scoring, update)
and the bytes autograd saves for backward in each trained role's pass (policy, critic), counted
with torch.autograd.graph.saved_tensors_hooks, each storage once per pass. Saved tensors include
the frozen weights a layer's backward reads: they are counted, though they take no extra memory.

    python benchmarks/memory_profile.py                          # shared-base RTO, 1 iteration
    python benchmarks/memory_profile.py --config full_rto -- --model.gradient_checkpointing true

Needs the inputs `python benchmarks/memory.py` prepares (it prepares them when missing). Prints
its numbers; nothing is written.
"""

from __future__ import annotations

import argparse
import collections
import gc
import sys
from pathlib import Path

import memory  # inputs, configurations and the RL settings of the memory benchmark (beside it)

ROOT = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="shared_rto", choices=list(memory.CONFIGS))
    parser.add_argument("--work", type=Path, default=ROOT / "_runs" / "memory")
    args, extra = parser.parse_known_args()
    inputs = memory.prepare_inputs(args.work, None)
    cfg = memory.CONFIGS[args.config]
    rl_args = memory.rl_command(args.config, cfg, inputs, args.work / "profile")
    rl_args += ["--train.max_steps", "1", *[a for a in extra if a != "--"]]

    import torch

    from rto.cli import main as rto_main
    from rto.rl import roles as rl_roles
    from rto.rl import trainer as rl_trainer

    def rss(key: str) -> float:
        return memory.status_kb(key) / 1024

    def phase(name: str) -> None:
        original = getattr(rl_trainer.PPOTrainer, name)

        def measured(self, *a, **k):  # type: ignore[no-untyped-def]
            gc.collect()
            start = rss("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
            out = original(self, *a, **k)
            print(f"[profile] {name}: RSS at start {start:.0f} MB, peak {rss('VmHWM'):.0f} MB, "
                  f"after {rss('VmRSS'):.0f} MB", flush=True)  # fmt: skip
            return out

        setattr(rl_trainer.PPOTrainer, name, measured)

    for name in ("rollout", "score", "update"):  # the phases of PPOTrainer.train
        phase(name)

    saved: collections.Counter = collections.Counter()
    passes: collections.Counter = collections.Counter()
    forward = rl_roles.ActorCritic.forward

    def counted_forward(self, role, *a, **k):  # type: ignore[no-untyped-def]
        seen: set[int] = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                saved[role] += storage.nbytes()
            return t

        if torch.is_grad_enabled():
            passes[role] += 1
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return forward(self, role, *a, **k)

    rl_roles.ActorCritic.forward = counted_forward
    code = rto_main(["rl", *rl_args])
    for role, nbytes in saved.items():
        n = max(passes[role], 1)
        print(f"[profile] saved for backward, {role}: {nbytes / 2**20 / n:.0f} MB per pass "
              f"({n} passes of micro-batch size "
              f"{memory.RL_SIZES[memory.RL_SIZES.index('--train.micro_batch_size') + 1]})")  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
