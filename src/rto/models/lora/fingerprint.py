"""Fingerprints: a hash of a model's weights, so that an adapter never silently lands on a base
that was retrained or replaced, and of a base + adapter chain (LoRA DPO on a LoRA SFT)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from rto.models.lora.record import ADAPTER_WEIGHTS

_SAMPLES_PER_TENSOR = 1024


def weights_fingerprint(model: Any) -> str | None:
    """A hash of a model's body (all but its output layer or score head, so a causal LM and the
    reward model built on it agree), read at up to 1024 evenly spaced entries of every tensor,
    rounded to bfloat16: the same for a base loaded in float32 or bfloat16, different for a
    retrained one (fine-tuning moves essentially every entry). None under ZeRO-3, whose
    parameters are shards."""
    body = getattr(model, model.base_model_prefix, model)
    digest = hashlib.sha256()
    for name, tensor in sorted(body.named_parameters()):
        if hasattr(tensor, "ds_id"):
            return None
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].float().to(torch.bfloat16)
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.view(torch.int16).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(model: Any) -> str | None:
    """The fingerprint of a loaded model: its weights', or, when it came from an adapter folder,
    the chain's (set by `load_adapter_folder`)."""
    return getattr(model, "rto_fingerprint", None) or weights_fingerprint(model)


def chain_fingerprint(base_fingerprint: str | None, folder: Path) -> str | None:
    if base_fingerprint is None:
        return None
    weights = folder / ADAPTER_WEIGHTS
    adapter = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else "none"
    return hashlib.sha256(f"{base_fingerprint}+{adapter}".encode()).hexdigest()[:16]
