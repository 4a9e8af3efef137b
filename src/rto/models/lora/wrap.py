"""A LoRA adapter on a model: added to train (`add_adapter`), loaded from an adapter folder and
merged into its base (`load_adapter_folder`), or switched off (`AdapterOff`, the reference of a
LoRA policy trained from it)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rto.errors import ConfigError, ModelError, loading
from rto.models.lora.fingerprint import chain_fingerprint, fingerprint
from rto.models.lora.peft_api import import_peft, quiet_peft
from rto.models.lora.record import ALL_LINEAR, AdapterBase, base_section, locate_base


def describe_base(section: Any, source: str, model: Any, *, score_head: bool) -> AdapterBase:
    """The record of `model`, loaded from `source` with `section`'s options, as an adapter's base."""
    location = source
    if source == section.path and section.gguf_file:
        location = os.path.join(source, section.gguf_file)
    if os.path.exists(location):
        location = os.path.abspath(location)
    revision = section.revision if source == section.path else None
    return AdapterBase(location, revision, fingerprint(model), score_head)


def lora_config(lora: Any, *, score_head: bool) -> Any:
    peft = import_peft()
    targets = lora.target_modules
    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha if lora.alpha is not None else 2.0 * lora.r,
        lora_dropout=lora.dropout,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else list(targets),
        task_type="SEQ_CLS" if score_head else "CAUSAL_LM",
        modules_to_save=["score"] if score_head else None,
    )


def _linear_layer_names(model: Any) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D))
    }
    return sorted(names)


def add_adapter(
    model: Any, section: Any, lora: Any, *, score_head: bool = False, source: str | None = None
) -> tuple[Any, AdapterBase]:
    """(`model` (loaded from `source`, default section.path) frozen, with new LoRA adapters to
    train; the record of its base). The adapters start at zero (peft's B = 0), so the new model
    computes exactly what the base did."""
    peft = import_peft()
    base = describe_base(section, source or section.path, model, score_head=score_head)
    config = lora_config(lora, score_head=score_head)
    with quiet_peft():
        wrapped = wrap(model, config, lora, base, peft.get_peft_model)
    if score_head:  # trained whole: keep it in float32 even on a bfloat16 base
        head = wrapped.get_base_model().score
        for p in head.parameters():
            p.data = p.data.float()
    return wrapped, base


def wrap(model: Any, config: Any, lora: Any, base: AdapterBase, get_peft_model: Callable) -> Any:
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(
            f"config key 'lora.target_modules' ({', '.join(lora.target_modules)}) does not fit "
            f"the model at {base.base_model}: {exc}. Its linear layers are named "
            f"{', '.join(_linear_layer_names(model))}; or use all-linear"
        ) from None


def load_adapter_folder(section: Any, folder: str | Path, load_base: Callable[[Any], Any]) -> Any:
    """Base + the adapter in `folder`, merged into a plain model (requires_grad and train / eval
    mode are the caller's to set). `load_base(section)` loads the base given by section.path, so
    a base that is itself an adapter folder loads the same way."""
    peft = import_peft()
    folder = Path(folder)
    base = locate_base(folder)
    model = load_base(base_section(section, base))
    found = fingerprint(model)
    if base.fingerprint and found and found != base.fingerprint:
        raise ModelError(
            f"the LoRA adapter at {folder} was trained on a different model than the one now at "
            f"{base.base_model} (weights fingerprint {found}, recorded {base.fingerprint}): the "
            "base was retrained or replaced since; retrain the adapter on it, or put the "
            "original base back"
        )
    config = peft.PeftConfig.from_pretrained(str(folder))
    config.task_type = None  # any model class: a causal LM's adapter also fits its reward model
    config.inference_mode = True
    with loading(f"LoRA adapter onto its base {base.base_model}", str(folder)), quiet_peft():
        wrapped = peft.PeftModel.from_pretrained(model, str(folder), config=config)
    merged = wrapped.merge_and_unload()
    merged.rto_fingerprint = chain_fingerprint(found or base.fingerprint, folder)
    return merged


class AdapterOff:
    """pi_ref of a LoRA policy trained from the reference: the same model with its adapter
    disabled, which computes exactly the frozen base. Runs an op (models/forward.run_op) with
    the adapter off (no_grad is the caller's)."""

    def __init__(self, peft_model: Any):
        self.model = peft_model

    def __call__(self, op: Any, *args: Any, **kwargs: Any) -> Any:
        with self.model.disable_adapter():
            return op(self.model, *args, **kwargs)
