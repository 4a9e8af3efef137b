"""peft as rto uses it: imported on demand (LoRA is an extra), its notes that say nothing to an
rto user quieted, and what an adapter folder or a peft model is."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rto.errors import ModelError
from rto.models.lora.record import ADAPTER_CONFIG


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft's notes that say nothing to an rto user: GPT-2's Conv1D layers get fan_in_fan_out
    set; its check of gradient checkpointing reads a property transformers renamed; saving an
    adapter whose base is itself an adapter folder finds no config.json there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
        yield


def import_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ModelError(
            "LoRA (lora.r > 0, or a model given as a peft adapter folder) needs the peft "
            "package: pip install 'rto[peft]'"
        ) from None
    return peft


def is_adapter(path: str | Path | None) -> bool:
    """A local folder that holds a peft adapter (adapter_config.json)."""
    return bool(path) and (Path(path) / ADAPTER_CONFIG).is_file()


def is_peft_model(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def hf_model(model: Any) -> Any:
    """The Hugging Face model inside a peft model (its adapters injected), or `model` itself."""
    return model.get_base_model() if is_peft_model(model) else model


def is_tuner_layer(module: Any) -> bool:
    """A layer peft injected adapters into."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)
