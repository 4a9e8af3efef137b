"""The adapter folder's record of its base (`lora_base.json`, beside peft's own files): what it
holds, how it is written, and how the base is found again where it is now."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from rto.errors import ModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_FILE = "lora_base.json"
ALL_LINEAR = "all-linear"
# What the other kind of output leaves in a folder (a full model, an adapter): a stage that
# writes one removes the other, so that nobody loads a stale model from an overwritten run.
FULL_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors*",
    "model-*.safetensors",
)
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FILE)


@dataclasses.dataclass
class AdapterBase:
    """The model an adapter was trained on."""

    base_model: str  # absolute folder or .gguf file, or a hub id
    revision: str | None = None
    fingerprint: str | None = None
    score_head: bool = False

    @property
    def is_local(self) -> bool:
        return os.path.isabs(self.base_model)

    @property
    def peft_path(self) -> str:
        """What peft's base_model_name_or_path can hold: a folder or hub id (a GGUF base is its
        folder; pass gguf_file=... to from_pretrained yourself)."""
        if self.base_model.endswith(".gguf"):
            return os.path.dirname(self.base_model)
        return self.base_model

    def record(self, adapter_folder: Path) -> dict[str, Any]:
        relative = None
        if self.is_local:
            relative = os.path.relpath(self.base_model, os.path.abspath(adapter_folder))
        return {"base_model": self.base_model, "relative": relative, "revision": self.revision,
                "fingerprint": self.fingerprint, "score_head": self.score_head}  # fmt: skip


def locate_base(folder: str | Path) -> AdapterBase:
    """The base of the adapter in `folder`, found where it is now: beside the adapter as
    recorded (a moved run folder), at its absolute path, or on the hub; an error says what is
    missing otherwise."""
    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    record: dict[str, Any] = {}
    if (folder / BASE_FILE).is_file():
        record = json.loads((folder / BASE_FILE).read_text())
    named = record.get("base_model") or config.get("base_model_name_or_path")
    if not named:
        raise ModelError(
            f"the LoRA adapter at {folder} does not say which model it was trained on "
            f"(no base_model_name_or_path in {folder / ADAPTER_CONFIG}); set it to the base "
            "model's folder or hub id"
        )
    candidates = []
    if record.get("relative"):
        candidates.append(
            os.path.normpath(os.path.join(os.path.abspath(folder), record["relative"]))
        )
    candidates.append(named)
    found = next((c for c in candidates if os.path.exists(c)), None)
    looks_local = os.path.isabs(named) or named.startswith(".") or named.endswith(".gguf")
    if found is None and looks_local:
        where = " or ".join(candidates)
        raise ModelError(
            f"the LoRA adapter at {folder} was trained on the base model {named}, which is not "
            f"there any more (looked for {where}); put the base model back, or set "
            f"base_model_name_or_path in {folder / ADAPTER_CONFIG} (and base_model in "
            f"{folder / BASE_FILE}) to where it is now"
        )
    head = record.get("score_head")
    if head is None:  # an adapter from elsewhere: a peft sequence-classification adapter
        head = config.get("task_type") == "SEQ_CLS" or "score" in (
            config.get("modules_to_save") or []
        )
    return AdapterBase(
        found or named,
        record.get("revision", config.get("revision")),
        record.get("fingerprint"),
        bool(head),
    )


def base_section(section: Any, base: AdapterBase) -> Any:
    """`section`'s loading options (dtype, attention kernel ...) pointed at an adapter's base."""
    return dataclasses.replace(
        section, path=base.base_model, gguf_file=None, revision=base.revision, tokenizer=None
    )


def remove_files(out: Path, patterns: tuple[str, ...], accelerator: Any) -> None:
    if accelerator.is_main_process and out.is_dir():
        for pattern in patterns:
            for stale in out.glob(pattern):
                stale.unlink()
