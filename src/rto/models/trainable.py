"""A model a stage trains, from loading to saving: full fine-tuning, or a frozen base with a new
LoRA adapter (`models/lora.py`).

Every training stage does the same three things: load its base (frozen under LoRA, so `auto`
picks a frozen model's dtype), add a trainable adapter when lora.r > 0, and, once trained, save
it as a plain Hugging Face folder (full fine-tuning, or lora.merge) or as an adapter folder with
the record of its base (`lora_base.json`). `Trainable` keeps what the save needs (the base's
record) beside the model, so nothing is stuck onto the model object.

    sft, dpo, rl policy     load_trainable_lm(section, lora)
    rm, rl critic           load_trainable_scorer(section, lora, source, ...)  (a TokenScorer)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rto.files import write_json
from rto.models import lora as peft_lora
from rto.models.forward import Layout, TokenScorer
from rto.models.load import (
    load_causal_lm,
    load_sequence_scorer,
    resolve_dtype,
    save_pretrained,
)
from rto.models.placement import shards_weights


def frozen_base(section: Any, lora: Any) -> Any:
    """The model section to load a base with: under LoRA the base is frozen, so `auto` picks the
    dtype of a frozen model (bfloat16 on GPUs that support it); adapters and heads train in
    float32 all the same."""
    if not lora.enabled or section.dtype != "auto":
        return section
    dtype = resolve_dtype("auto", trainable=False)
    return dataclasses.replace(section, dtype=str(dtype).removeprefix("torch."))


@dataclasses.dataclass
class Trainable:
    """A model to train and how to save it.

    model: what the engine trains (a peft model under LoRA; a `TokenScorer` for reward models
           and critics)
    base:  under LoRA, the record of the frozen base the adapter is saved against; None for
           full fine-tuning"""

    model: Any
    base: peft_lora.AdapterBase | None = None

    def save(self, prepared: Any, tokenizer: Any, out: str | Path, accelerator: Any, lora: Any,
             part: str | None = None) -> None:  # fmt: skip
        """The trained model into `out`. `prepared` is what accelerate returned for `model` (or
        the wrapper holding it as submodule `part`): under ZeRO-3 / FSDP its weights are
        gathered from there."""
        out = Path(out)
        if self.base is None:
            peft_lora.remove_files(out, peft_lora.ADAPTER_FILES, accelerator)
            save_pretrained(prepared, tokenizer, out, accelerator, part=part)
            return
        unwrapped = accelerator.unwrap_model(prepared)
        if part:
            unwrapped = getattr(unwrapped, part)
        peft_model = getattr(unwrapped, "hf", unwrapped)  # a TokenScorer's peft model
        if lora.merge:
            if shards_weights(accelerator):
                accelerator.print(
                    "[rto] lora.merge is not supported under ZeRO-3 / FSDP (sharded weights); "
                    f"saved the adapter folder instead: merge it with peft's merge_and_unload ({out})"
                )
            else:
                merged = peft_model.merge_and_unload()
                peft_lora.remove_files(out, peft_lora.ADAPTER_FILES, accelerator)
                if accelerator.is_main_process:
                    save_pretrained(merged, tokenizer, out)
                accelerator.wait_for_everyone()
                return
        peft_lora.remove_files(out, peft_lora.FULL_MODEL_FILES, accelerator)
        config = peft_model.peft_config["default"]
        config.base_model_name_or_path = self.base.peft_path
        config.revision = self.base.revision
        with peft_lora.quiet_peft():
            save_pretrained(prepared, tokenizer, out, accelerator, part=part)
        if accelerator.is_main_process:
            write_json(out / peft_lora.BASE_FILE, self.base.record(out))


def make_trainable(model: Any, section: Any, lora: Any, *, score_head: bool = False,
                   source: str | None = None) -> Trainable:  # fmt: skip
    """`model` (loaded from `source`, default section.path) as it trains: whole, or frozen with
    a new LoRA adapter (and, with `score_head`, its whole score head) when lora.r > 0."""
    if not lora.enabled:
        return Trainable(model)
    wrapped, base = peft_lora.add_adapter(
        model, section, lora, score_head=score_head, source=source
    )
    return Trainable(wrapped, base)


def load_trainable_lm(section: Any, lora: Any, *, keep_dropout: bool = False,
                      role: str = "causal language model") -> Trainable:  # fmt: skip
    """The causal LM at section.path, ready to train (SFT, DPO, the RL policy); `role` names it
    in error messages."""
    model = load_causal_lm(frozen_base(section, lora), keep_dropout=keep_dropout, role=role)
    return make_trainable(model, section, lora)


def load_trainable_scorer(section: Any, lora: Any, source: str, *, require_head: bool, role: str,
                          pad_token_id: int | None = None) -> Trainable:  # fmt: skip
    """A sequence scorer (one output) from `source`, ready to train (the reward model, the RL
    critic), wrapped in a `TokenScorer`; its LoRA adapter carries the whole score head."""
    hf = load_sequence_scorer(frozen_base(section, lora), source, trainable=True,
                              require_head=require_head, role=role)  # fmt: skip
    if pad_token_id is not None:
        hf.config.pad_token_id = pad_token_id
    trainable = make_trainable(hf, section, lora, score_head=True, source=source)
    return Trainable(TokenScorer(trainable.model, Layout.of(section)), trainable.base)
