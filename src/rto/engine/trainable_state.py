"""Checkpoints hold what training changes: a model's frozen parameters (the base under a LoRA
adapter) are left out of them, since `--resume` loads those again from the model's path.

For an 8B base in bfloat16 that is 16 GB less per checkpoint; the adapters, score heads and
optimiser states are what a LoRA checkpoint holds. Applies to models accelerate saves whole
(one process, DDP); DeepSpeed and FSDP checkpoints are written by those libraries as before.
"""

from __future__ import annotations

from typing import Any

import torch


def checkpoint_trainable_only(accelerator: Any) -> None:
    accelerator.register_save_state_pre_hook(_drop_frozen)
    accelerator.register_load_state_pre_hook(_load_trainable)


def _frozen_names(model: Any) -> set[str]:
    """State-dict names of frozen parameters (tied ones under every name they have)."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _drop_frozen(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
    for model, state in zip(models, weights):
        for name in _frozen_names(model) & set(state):
            del state[name]


def _load_trainable(models: list[Any], input_dir: str) -> None:
    """Stand each model with frozen parameters in for one whose state is its trainable part,
    so that loading checks exactly those are present."""
    for i, model in enumerate(models):
        frozen = _frozen_names(model)
        if frozen:
            models[i] = _TrainablePart(model, frozen)


class _TrainablePart:
    """What accelerate's loader asks of a model (state_dict, load_state_dict), restricted to
    the parameters that train."""

    def __init__(self, model: Any, frozen: set[str]):
        self.model, self.frozen = model, frozen

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = self.model.state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if k not in self.frozen}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, **kwargs: Any) -> Any:
        result = self.model.load_state_dict(state, strict=False, **kwargs)
        missing = [k for k in result.missing_keys if k not in self.frozen]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"checkpoint does not fit the model: missing {missing}, "
                f"unexpected {result.unexpected_keys}"
            )
        return torch.nn.modules.module._IncompatibleKeys(missing, result.unexpected_keys)
