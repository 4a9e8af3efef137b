"""One frozen base with named LoRA adapters that take turns on it (the RL stage's shared base)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rto.errors import ModelError
from rto.files import write_json
from rto.models.lora.merge import merged_state_dict
from rto.models.lora.peft_api import import_peft, is_tuner_layer, quiet_peft
from rto.models.lora.record import (
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    BASE_FILE,
    FULL_MODEL_FILES,
    remove_files,
)
from rto.models.lora.wrap import describe_base, lora_config, wrap


class SharedAdapters:
    """One frozen base with named LoRA adapters that take turns on it (the RL stage's shared
    base: policy, critic, dpo, reward). `using(name)` runs a block with one adapter active,
    `using(None)` with every adapter off (the base alone); nothing is copied, only which adapter
    each LoRA layer adds changes.

    peft's own switches (set_adapter, disable_adapter) also mark the adapter they activate as
    trainable and every other one as frozen; here two adapters train at once (policy and
    critic), so which adapters train is fixed when they are added and every switch puts it back.
    Between turns the policy's adapter is active, so the peft model generates and trains as the
    policy when called directly."""

    def __init__(self, base: Any, section: Any, lora: Any, default: str = "policy"):
        peft = import_peft()
        self.record = describe_base(section, section.path, base, score_head=False)
        with quiet_peft():
            self.model = wrap(base, lora_config(lora, score_head=False), lora, self.record,
                               lambda m, c: peft.get_peft_model(m, c, adapter_name=default))  # fmt: skip
        self.trains: dict[str, bool] = {default: True}
        self.active: str | None = default
        self._layers = [m for m in self.model.modules() if is_tuner_layer(m)]
        self._restore_requires_grad()
        if section.gradient_checkpointing:  # recomputation must see the adapter the pass used
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
                "use_reentrant": False, "context_fn": self._checkpoint_contexts})  # fmt: skip

    @property
    def hf(self) -> Any:
        """The Hugging Face causal LM, its LoRA layers injected."""
        return self.model.get_base_model()

    def add(self, name: str, config: Any, *, trainable: bool) -> None:
        """A new adapter (B = 0: it starts as the base)."""
        config = dataclasses.replace(config, task_type="CAUSAL_LM", modules_to_save=None,
                                     inference_mode=not trainable)  # fmt: skip
        with quiet_peft():
            self.model.add_adapter(name, config)
        self.trains[name] = trainable
        self._layers = [m for m in self.model.modules() if is_tuner_layer(m)]
        self._restore_requires_grad()

    def load(self, name: str, folder: str | Path, *, trainable: bool) -> torch.nn.Linear | None:
        """The adapter in `folder` as adapter `name`; returns its score head (a reward model's),
        as a separate module, or None."""
        from safetensors.torch import load_file

        peft = import_peft()
        folder = Path(folder)
        self.add(name, peft.PeftConfig.from_pretrained(str(folder)), trainable=trainable)
        saved = load_file(str(folder / ADAPTER_WEIGHTS))
        head_state = {k.rsplit(".", 1)[-1]: v for k, v in saved.items() if _is_head_key(k)}
        state = {k: v for k, v in saved.items() if not _is_head_key(k)}
        expected = set(peft.get_peft_model_state_dict(self.model, adapter_name=name))
        if set(state) != expected:
            odd = sorted(set(state) ^ expected)[:3]
            raise ModelError(
                f"the LoRA adapter at {folder} does not fit the shared base {self.record.base_model} "
                f"(weights that differ: {', '.join(odd)}): was it trained on another architecture?"
            )
        peft.set_peft_model_state_dict(self.model, state, adapter_name=name)
        self._restore_requires_grad()
        if not head_state:
            return None
        weight = head_state["weight"]
        head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in head_state)
        head.load_state_dict(head_state)
        return head.to(weight.device).requires_grad_(trainable)

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        """The parameters of adapter `name`."""
        found = []
        for layer in self._layers:
            for attribute in layer.adapter_layer_names:
                part = getattr(layer, attribute)
                if name in part:
                    item = part[name]
                    found.extend(
                        [item] if isinstance(item, torch.nn.Parameter) else item.parameters()
                    )
        return found

    @contextlib.contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        """A block run with adapter `name` active (None: every adapter off)."""
        before = self.active
        if name == before:
            yield
            return
        self._activate(name)
        try:
            yield
        finally:
            self._activate(before)

    @contextlib.contextmanager
    def training(self, name: str) -> Iterator[None]:
        """A block in which frozen adapter `name` trains too (the DPO adapter's online update):
        its parameters require gradients through every switch inside, and are frozen again
        after, so that whatever wraps the base for the policy (DDP, the checkpoints) sees it
        frozen."""
        before = self.trains[name]
        self.trains[name] = True
        self._restore_requires_grad()
        try:
            yield
        finally:
            self.trains[name] = before
            self._restore_requires_grad()

    def _activate(self, name: str | None) -> None:
        for layer in self._layers:
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.set_adapter(name)
                layer.enable_adapters(True)
        self.active = name
        self._restore_requires_grad()

    def _restore_requires_grad(self) -> None:
        for name, trainable in self.trains.items():
            for p in self.parameters(name):
                p.requires_grad_(trainable)

    def _checkpoint_contexts(self) -> tuple[Any, Any]:
        """torch.utils.checkpoint's context_fn: a layer's forward is recomputed during backward,
        when the policy's adapter is active again; recompute it with the adapter it ran with."""
        return contextlib.nullcontext(), self.using(self.active)

    def save(self, name: str, out: str | Path, tokenizer: Any, accelerator: Any,
             head: torch.nn.Module | None = None) -> None:  # fmt: skip
        """Adapter `name` (with `head` as its score head) as an adapter folder on the shared
        base, as `models.trainable.Trainable.save` writes one: peft + transformers load it alone."""
        from safetensors.torch import save_file

        peft = import_peft()
        out = Path(out)
        remove_files(out, FULL_MODEL_FILES, accelerator)
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            state = peft.get_peft_model_state_dict(self.model, adapter_name=name)
            if head is not None:  # where peft keeps a modules_to_save score head
                state.update(
                    {f"base_model.model.score.{k}": v for k, v in head.state_dict().items()}
                )
            state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            config = dataclasses.replace(
                self.model.peft_config[name], base_model_name_or_path=self.record.peft_path,
                revision=self.record.revision, inference_mode=True,
                task_type="SEQ_CLS" if head is not None else "CAUSAL_LM",
                modules_to_save=["score"] if head is not None else None,
            )  # fmt: skip
            config.save_pretrained(str(out))
            save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            tokenizer.save_pretrained(out)
            record = dataclasses.replace(self.record, score_head=head is not None)
            write_json(out / BASE_FILE, record.record(out))
        accelerator.wait_for_everyone()

    def save_merged(self, name: str, out: str | Path, tokenizer: Any, accelerator: Any) -> None:
        """The base with adapter `name` merged in, as a plain Hugging Face folder: the merged
        weights are computed beside the shared base, which stays as it is (merging in place and
        unmerging would not give back the same bits)."""
        remove_files(out, ADAPTER_FILES, accelerator)
        if accelerator.is_main_process:
            state = merged_state_dict(self.model, name)
            self.hf.save_pretrained(Path(out), state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(out)
        accelerator.wait_for_everyone()


def _is_head_key(key: str) -> bool:
    return key.startswith("base_model.model.score.")
