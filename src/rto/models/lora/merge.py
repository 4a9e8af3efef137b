"""A model's weights with a LoRA adapter merged in, as a plain Hugging Face state dict: what a
vLLM engine loads before each rollout and what a merged folder holds."""

from __future__ import annotations

from typing import Any

import torch

from rto.models.lora.peft_api import hf_model, is_peft_model, is_tuner_layer


@torch.no_grad()
def merged_state_dict(model: Any, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The plain Hugging Face state dict of `model` (a plain model, or a peft model with its
    adapter `adapter` merged in; default: the active adapter), computed beside the model, which
    stays as it is. What a vLLM engine or a plain folder loads."""
    hf = hf_model(model)
    if not is_peft_model(model) and not any(".base_layer." in k for k in hf.state_dict()):
        return {k: v.detach() for k, v in hf.state_dict().items()}
    name = adapter or getattr(model, "active_adapter", None)
    deltas = {f"{module_name}.base_layer.weight": module.get_delta_weight(name)
              for module_name, module in hf.named_modules()
              if is_tuner_layer(module) and name in module.lora_A}  # fmt: skip
    state = {}
    for key, value in hf.state_dict().items():
        if ".lora_" in key:
            continue
        delta = deltas.get(key)
        value = value.detach()
        state[_plain_name(key)] = value if delta is None else value + delta.to(value)
    return state


def _plain_name(key: str) -> str:
    return key.replace(".base_layer.", ".")
